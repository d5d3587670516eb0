//! Blob URLs: parsing, the loopback rule for plain HTTP, and redaction of
//! the SAS signature wherever a URL or a message may carry one.

use super::{AzureError, AzureErrorKind};
use crate::error::Result;
use azure_core::http::Url;
use std::fmt;

/// True when `s` is written as a blob URL (`https://…` or `http://…`)
/// rather than a file name.
pub fn is_url(s: &str) -> bool {
    let l = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    l.starts_with("https://") || l.starts_with("http://")
}

/// `s` with the value of every `sig=` parameter replaced by `REDACTED`
/// (case-insensitive, percent-encoded `sig%3D` too): the SAS signature is
/// the secret of a SAS URL, and no output, error or log carries it.
pub fn redact(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &lower[i..];
        let key = if rest.starts_with("sig=") {
            Some(4)
        } else if rest.starts_with("sig%3d") {
            Some(6)
        } else {
            None
        };
        // A parameter name starts the query or follows `&` (or `%26`).
        let starts_param = i == 0 || {
            let before = &lower[..i];
            before.ends_with('?')
                || before.ends_with('&')
                || before.ends_with("%26")
                || before.ends_with("%3f")
                || !before
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if let (Some(k), true) = (key, starts_param) {
            out.push_str(&s[i..i + k]);
            out.push_str("REDACTED");
            let mut j = i + k;
            while j < s.len() {
                let c = s.as_bytes()[j];
                if c == b'&' || c.is_ascii_whitespace() || b"\"'<>),;".contains(&c) {
                    break;
                }
                if lower[j..].starts_with("%26") {
                    break;
                }
                j += 1;
            }
            i = j;
        } else {
            let Some(c) = s[i..].chars().next() else {
                break;
            };
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// A page or block blob named by URL: `https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?SAS`,
/// a managed disk's SAS URL, or the emulator's
/// `http://127.0.0.1:PORT/ACCOUNT/CONTAINER/BLOB?SAS`.
///
/// Its [`Display`](fmt::Display) form has the SAS signature redacted; the
/// full URL is only handed to the HTTP client.
#[derive(Clone)]
pub struct BlobUrl {
    url: Url,
    container: String,
    blob: String,
}

impl fmt::Debug for BlobUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobUrl({self})")
    }
}

impl fmt::Display for BlobUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.url.as_str()))
    }
}

/// True for a loopback host: 127.0.0.0/8, `::1` or `localhost`.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl BlobUrl {
    /// Parses a blob URL. `https` is always taken; plain `http` only to a
    /// loopback address (the local emulator) unless `allow_http` is set.
    ///
    /// # Errors
    /// A URL that does not parse, names no container and blob, or asks for
    /// plain HTTP to another host without `allow_http`.
    pub fn parse(s: &str, allow_http: bool) -> Result<BlobUrl> {
        let invalid = |why: &str| {
            AzureError::error(
                AzureErrorKind::InvalidUrl,
                redact(s),
                format!("not a blob URL: {why}"),
            )
        };
        let url = Url::parse(s).map_err(|e| invalid(&e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" if allow_http || is_loopback(&url) => {}
            "http" => {
                return Err(AzureError::error(
                    AzureErrorKind::PlainHttp,
                    redact(s),
                    "plain HTTP to a host that is not a loopback address would send the SAS \
                     unencrypted; use https (plain HTTP can be allowed explicitly)"
                        .into(),
                ))
            }
            other => return Err(invalid(&format!("scheme {other:?} (https or http)"))),
        }
        if url.host().is_none() {
            return Err(invalid("no host"));
        }
        let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
        // The emulator (an IP address or localhost as host) puts the account
        // first in the path; Azure puts it in the host name.
        let path_account = matches!(
            url.host(),
            Some(url::Host::Ipv4(_)) | Some(url::Host::Ipv6(_))
        ) || url
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("localhost"));
        let skip = usize::from(path_account);
        if segments.len() < skip + 2
            || segments[skip].is_empty()
            || segments[skip + 1..].join("/").is_empty()
        {
            return Err(invalid("the path names no container and blob"));
        }
        let container = segments[skip].to_string();
        let blob = segments[skip + 1..].join("/");
        Ok(BlobUrl {
            url,
            container,
            blob,
        })
    }

    /// The container's name.
    pub fn container(&self) -> &str {
        &self.container
    }

    /// The blob's name (percent-encoded as in the URL).
    pub fn blob(&self) -> &str {
        &self.blob
    }

    /// The host name.
    pub fn host(&self) -> String {
        match self.url.port() {
            Some(p) => format!("{}:{p}", self.url.host_str().unwrap_or_default()),
            None => self.url.host_str().unwrap_or_default().to_string(),
        }
    }

    /// The full URL, SAS included: for the HTTP client only.
    pub(crate) fn secret_url(&self) -> &Url {
        &self.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_every_signature() {
        let u = "https://a.blob.core.windows.net/c/b?sv=2024&sp=rw&sig=abc%2Bdef%3D&se=x";
        let r = redact(u);
        assert!(!r.contains("abc"), "{r}");
        assert!(r.contains("sig=REDACTED&se=x"), "{r}");
        let r = redact("error for url (http://h/c/b?SIG=Zz9) and sig%3DQq%26x");
        assert!(!r.contains("Zz9") && !r.contains("Qq"), "{r}");
        // Other parameters ending in sig are not parameters named sig.
        assert_eq!(redact("?xsig=1"), "?xsig=1");
    }

    #[test]
    fn urls_parse_with_the_loopback_rule() {
        let u = BlobUrl::parse(
            "http://127.0.0.1:10000/devstoreaccount1/c/dir/b.vhd?sig=s",
            false,
        )
        .unwrap();
        assert_eq!((u.container(), u.blob()), ("c", "dir/b.vhd"));
        assert!(!u.to_string().contains("=s"));
        let u = BlobUrl::parse("https://acct.blob.core.windows.net/c/b?sig=s", false).unwrap();
        assert_eq!((u.container(), u.blob()), ("c", "b"));
        let e = BlobUrl::parse("http://example.com/c/b?sig=secret", false).unwrap_err();
        assert!(e.to_string().contains("loopback") && !e.to_string().contains("secret"));
        assert!(BlobUrl::parse("http://example.com/c/b?sig=secret", true).is_ok());
        assert!(BlobUrl::parse("https://acct.blob.core.windows.net/c", false).is_err());
        assert!(is_url("HTTPS://x") && !is_url("disk.vhd"));
    }
}
