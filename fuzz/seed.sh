#!/usr/bin/env bash
# Builds the fuzz corpora from the project's fixtures: every image in
# testdata/ (VHD and VHDX, decompressed) and every input in tests/regressions/. For
# differencing_pair, the chains of testdata/ are joined as its targets read
# them (2-byte little-endian child length in sectors, child, parent).
set -euo pipefail
cd "$(dirname "$0")"
for t in open_map_read check differencing_pair; do mkdir -p "corpus/$t"; done
for f in ../testdata/*.vhd ../testdata/*.vhd.gz ../testdata/*.vhdx.gz ../tests/regressions/*.vhd ../tests/regressions/*.vhdx; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .gz)
    case "$f" in
        *.gz) gzip -dc "$f" > "corpus/open_map_read/$name" ;;
        *) cp "$f" "corpus/open_map_read/$name" ;;
    esac
    cp "corpus/open_map_read/$name" "corpus/check/$name"
done
python3 - <<'PY'
import gzip, pathlib
d = pathlib.Path("../testdata")
def read(n):
    p = d / n
    return gzip.decompress(p.read_bytes()) if n.endswith(".gz") else p.read_bytes()
for child, parent in [("hand-chain-child.vhd.gz", "hand-chain-base.vhd.gz"),
                      ("hand-chain-grandchild.vhd.gz", "hand-chain-child.vhd.gz"),
                      ("hand-vhdx-chain-child.vhdx.gz", "hand-vhdx-chain-base.vhdx.gz"),
                      ("hand-vhdx-chain-grandchild.vhdx.gz", "hand-vhdx-chain-child.vhdx.gz")]:
    c, p = read(child), read(parent)
    if len(c) % 512 or len(c) // 512 > 0xffff:
        continue
    out = pathlib.Path("corpus/differencing_pair") / child.replace(".gz", "")
    out.write_bytes((len(c) // 512).to_bytes(2, "little") + c + p)
PY
echo "corpora in fuzz/corpus/: $(ls corpus/open_map_read | wc -l) seeds each"
