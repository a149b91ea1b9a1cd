//! The URL under load: parsing `http://host[:port]`, name resolution, and the
//! loopback guard that keeps an accidental run from hammering a remote host.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("target {0:?} must start with http:// (TLS is not supported)")]
    Scheme(String),
    #[error("target {0:?} has no host")]
    NoHost(String),
    #[error("target {url:?} has an invalid port")]
    Port { url: String },
    #[error("target {url:?}: the base URL takes no path, use --path (got {path:?})")]
    Path { url: String, path: String },
    #[error("cannot resolve {host:?}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host:?} resolved to no address")]
    NoAddress { host: String },
    #[error(
        "refusing to load {host:?} ({addr}): it is not a loopback address \
         (127.0.0.0/8, ::1, localhost); pass --allow-remote if you own that host"
    )]
    NotLoopback { host: String, addr: IpAddr },
}

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given, for reports.
    pub url: String,
    /// Value of the `Host` header.
    pub host_header: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and resolves `url`; unless `allow_remote`, every address the
    /// name resolves to must be loopback.
    pub fn resolve(url: &str, allow_remote: bool) -> Result<Target, TargetError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| TargetError::Scheme(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        if !path.is_empty() && path != "/" {
            return Err(TargetError::Path {
                url: url.to_string(),
                path: path.to_string(),
            });
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| TargetError::Port {
            url: url.to_string(),
        })?;
        if host.is_empty() {
            return Err(TargetError::NoHost(url.to_string()));
        }
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|source| TargetError::Resolve {
                host: host.to_string(),
                source,
            })?
            .collect();
        // Prefer IPv4: servers (kvmfork included) usually listen on 127.0.0.1,
        // while `localhost` often resolves to ::1 first.
        let first = *addrs
            .iter()
            .find(|addr| addr.is_ipv4())
            .or(addrs.first())
            .ok_or_else(|| TargetError::NoAddress {
                host: host.to_string(),
            })?;
        if !allow_remote {
            if let Some(remote) = addrs.iter().find(|addr| !is_loopback(addr.ip())) {
                return Err(TargetError::NotLoopback {
                    host: host.to_string(),
                    addr: remote.ip(),
                });
            }
        }
        let host_header = if port == 80 {
            authority_host(authority).to_string()
        } else {
            authority.to_string()
        };
        Ok(Target {
            url: url.to_string(),
            host_header,
            addr: first,
        })
    }
}

/// Loopback including IPv4-mapped IPv6 (`::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Splits `host[:port]` / `[v6][:port]`; the port defaults to 80.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

fn authority_host(authority: &str) -> &str {
    authority.strip_suffix(":80").unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3:1/",
            "http://[::1]:9000",
            "http://localhost:8080",
        ] {
            let target = Target::resolve(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(is_loopback(target.addr.ip()), "{url}");
        }
        // localhost may resolve to ::1 first; the IPv4 address wins.
        let localhost = Target::resolve("http://localhost:8080", false).unwrap();
        assert!(
            localhost.addr.is_ipv4()
                || !"localhost:8080"
                    .to_socket_addrs()
                    .unwrap()
                    .any(|a| a.is_ipv4())
        );
        let target = Target::resolve("http://127.0.0.1", false).unwrap();
        assert_eq!(target.addr.port(), 80);
        assert_eq!(target.host_header, "127.0.0.1");
        assert_eq!(
            Target::resolve("http://127.0.0.1:8080", false)
                .unwrap()
                .host_header,
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn remote_targets_are_refused_without_allow_remote() {
        for url in [
            "http://10.0.0.1:80",
            "http://192.168.1.1",
            "http://0.0.0.0:8080",
            "http://[2001:db8::1]:80",
        ] {
            let err = Target::resolve(url, false).unwrap_err();
            assert!(
                matches!(err, TargetError::NotLoopback { .. }),
                "{url}: {err}"
            );
            assert!(err.to_string().contains("--allow-remote"));
            Target::resolve(url, true).unwrap_or_else(|e| panic!("{url} with allow_remote: {e}"));
        }
    }

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn malformed_urls_are_refused() {
        assert!(matches!(
            Target::resolve("https://127.0.0.1", false),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::resolve("127.0.0.1:80", false),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::resolve("http://127.0.0.1:99999", false),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            Target::resolve("http://:80", false),
            Err(TargetError::NoHost(_))
        ));
        assert!(matches!(
            Target::resolve("http://127.0.0.1/v1/exec", false),
            Err(TargetError::Path { .. })
        ));
    }
}
