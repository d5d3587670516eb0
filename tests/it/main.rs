//! vhdkit's integration tests, as one test binary: the modules share one
//! build of the helpers and one link step (seven binaries took most of the
//! test build's time). Run a part with `cargo test --test it MODULE::`.

mod common;
#[path = "../../examples/make_testdata.rs"]
#[allow(dead_code)]
mod make_testdata;

#[cfg(feature = "cli")]
mod api;
mod cli;
mod convert;
mod corpus;
mod durability;
mod formats;
mod hostile;
mod ops;
// FIFOs, device nodes, loop devices and /proc: Linux.
#[cfg(target_os = "linux")]
mod security;
mod structures;
mod testdata;
