//! What gets sent: pre-serialised request templates (built-in kvmfork requests
//! or one from `--body-file`), the `--mix` weights, and a deterministic
//! weighted picker.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("mix entry {0:?} is not NAME=WEIGHT")]
    MixEntry(String),
    #[error("mix weight in {0:?} is not a positive integer")]
    MixWeight(String),
    #[error("unknown request {name:?} in --mix (known: {known})")]
    UnknownRequest { name: String, known: String },
    #[error("request {0:?} appears twice in --mix")]
    DuplicateRequest(String),
    #[error("--mix is empty")]
    EmptyMix,
    #[error("cannot read body file {path}: {source}")]
    BodyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("header {0:?} is not NAME: VALUE")]
    Header(String),
    #[error("header {0:?} is managed by loadgen and cannot be set")]
    ManagedHeader(String),
    #[error("invalid {what} {value:?}: control characters or spaces are not allowed")]
    RequestLine { what: &'static str, value: String },
}

/// Built-in request kinds for kvmfork.
pub const BUILTIN_NAMES: [&str; 4] = ["print", "numpy", "cpu", "health"];
/// Name of the request described by `--body-file`/`--method`/`--path`.
pub const CUSTOM_NAME: &str = "custom";

const NUMPY_CODE: &str = "import numpy as np\n\
rng = np.random.default_rng(7)\n\
m = rng.random((128, 128))\n\
print(round(float(np.linalg.norm(m @ m.T)), 3))\n";
const CPU_CODE: &str = "total = 0\n\
for i in range(1_000_000):\n    total += i * i % 7\n\
print(total)\n";

/// A request description before serialisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpec {
    pub name: String,
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Sent when there is a body and no `--header Content-Type`.
    pub content_type: Option<String>,
}

impl RequestSpec {
    /// The built-in request called `name`, if any.
    pub fn builtin(name: &str) -> Option<RequestSpec> {
        let exec = |code: &str| RequestSpec {
            name: name.to_string(),
            method: "POST".into(),
            path: "/v1/exec".into(),
            body: serde_json::json!({ "code": code, "language": "python", "timeout_seconds": 30 })
                .to_string()
                .into_bytes(),
            content_type: Some("application/json".into()),
        };
        match name {
            "print" => Some(exec("print(1+1)")),
            "numpy" => Some(exec(NUMPY_CODE)),
            "cpu" => Some(exec(CPU_CODE)),
            "health" => Some(RequestSpec {
                name: name.to_string(),
                method: "GET".into(),
                path: "/v1/health".into(),
                body: Vec::new(),
                content_type: None,
            }),
            _ => None,
        }
    }
}

/// Options that turn specs into wire bytes.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    pub host: String,
    pub api_key: Option<String>,
    /// Extra `Name: value` headers sent with every request.
    pub extra: Vec<(String, String)>,
}

/// A request ready to write; shared by all connections.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub bytes: Arc<[u8]>,
    pub is_head: bool,
}

/// Parses `--header "Name: value"`.
pub fn parse_header(raw: &str) -> Result<(String, String), WorkloadError> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| WorkloadError::Header(raw.to_string()))?;
    let name = name.trim();
    let value = value.trim();
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
    if !valid_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(WorkloadError::Header(raw.to_string()));
    }
    // Framing headers must match what loadgen actually sends.
    for managed in ["content-length", "transfer-encoding", "host", "connection"] {
        if name.eq_ignore_ascii_case(managed) {
            return Err(WorkloadError::ManagedHeader(name.to_string()));
        }
    }
    Ok((name.to_string(), value.to_string()))
}

fn check_token(what: &'static str, value: &str) -> Result<(), WorkloadError> {
    if value.is_empty() || value.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(WorkloadError::RequestLine {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Serialises `spec` as an HTTP/1.1 keep-alive request.
pub fn build_template(spec: &RequestSpec, headers: &Headers) -> Result<Template, WorkloadError> {
    check_token("method", &spec.method)?;
    check_token("path", &spec.path)?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kvmfork-loadgen/{}\r\n",
        spec.method,
        spec.path,
        headers.host,
        env!("CARGO_PKG_VERSION")
    );
    if let Some(key) = &headers.api_key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    let user_content_type = headers
        .extra
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    for (name, value) in &headers.extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let method_has_body = !matches!(spec.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if !spec.body.is_empty() || method_has_body {
        if let (Some(content_type), false) = (&spec.content_type, user_content_type) {
            if !spec.body.is_empty() {
                head.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
        }
        head.push_str(&format!("Content-Length: {}\r\n", spec.body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&spec.body);
    Ok(Template {
        name: spec.name.clone(),
        bytes: bytes.into(),
        is_head: spec.method == "HEAD",
    })
}

/// One `--mix` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MixEntry {
    pub name: String,
    pub weight: u32,
}

/// Parses `print=8,numpy=1,health=1`; a bare name means weight 1.
pub fn parse_mix(raw: &str) -> Result<Vec<MixEntry>, WorkloadError> {
    let mut entries: Vec<MixEntry> = Vec::new();
    for part in raw
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let (name, weight) = match part.split_once('=') {
            Some((name, weight)) => {
                let weight: u32 = weight
                    .trim()
                    .parse()
                    .map_err(|_| WorkloadError::MixWeight(part.to_string()))?;
                (name.trim(), weight)
            }
            None => (part, 1),
        };
        if name.is_empty() {
            return Err(WorkloadError::MixEntry(part.to_string()));
        }
        if weight == 0 {
            return Err(WorkloadError::MixWeight(part.to_string()));
        }
        if entries.iter().any(|entry| entry.name == name) {
            return Err(WorkloadError::DuplicateRequest(name.to_string()));
        }
        entries.push(MixEntry {
            name: name.to_string(),
            weight,
        });
    }
    if entries.is_empty() {
        return Err(WorkloadError::EmptyMix);
    }
    Ok(entries)
}

/// Resolves mix names to specs: built-ins plus the optional custom request.
pub fn resolve_mix(
    mix: &[MixEntry],
    custom: Option<&RequestSpec>,
) -> Result<Vec<RequestSpec>, WorkloadError> {
    mix.iter()
        .map(|entry| {
            if entry.name == CUSTOM_NAME {
                if let Some(custom) = custom {
                    return Ok(custom.clone());
                }
            }
            RequestSpec::builtin(&entry.name).ok_or_else(|| {
                let mut known: Vec<&str> = BUILTIN_NAMES.to_vec();
                if custom.is_some() {
                    known.push(CUSTOM_NAME);
                }
                WorkloadError::UnknownRequest {
                    name: entry.name.clone(),
                    known: known.join(", "),
                }
            })
        })
        .collect()
}

/// Deterministic smooth weighted round robin (as in nginx upstreams): over
/// every `sum(weights)` picks each entry is chosen exactly `weight` times,
/// spread out rather than in runs.
#[derive(Debug, Clone)]
pub struct Picker {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl Picker {
    pub fn new(weights: &[u32]) -> Picker {
        assert!(!weights.is_empty(), "picker needs at least one entry");
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
        let total = weights.iter().sum();
        Picker {
            current: vec![0; weights.len()],
            weights,
            total,
        }
    }

    /// Index of the next entry.
    pub fn next_index(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_bare_names() {
        let mix = parse_mix("print=8, numpy=1,health").unwrap();
        assert_eq!(
            mix,
            vec![
                MixEntry {
                    name: "print".into(),
                    weight: 8
                },
                MixEntry {
                    name: "numpy".into(),
                    weight: 1
                },
                MixEntry {
                    name: "health".into(),
                    weight: 1
                },
            ]
        );
    }

    #[test]
    fn bad_mixes_are_refused() {
        assert!(matches!(parse_mix(""), Err(WorkloadError::EmptyMix)));
        assert!(matches!(
            parse_mix("print=0"),
            Err(WorkloadError::MixWeight(_))
        ));
        assert!(matches!(
            parse_mix("print=x"),
            Err(WorkloadError::MixWeight(_))
        ));
        assert!(matches!(parse_mix("=3"), Err(WorkloadError::MixEntry(_))));
        assert!(matches!(
            parse_mix("print,print=2"),
            Err(WorkloadError::DuplicateRequest(_))
        ));
        let mix = parse_mix("nope=1").unwrap();
        assert!(matches!(
            resolve_mix(&mix, None),
            Err(WorkloadError::UnknownRequest { .. })
        ));
        let mix = parse_mix("custom").unwrap();
        assert!(resolve_mix(&mix, None).is_err());
    }

    #[test]
    fn picker_honours_weights_exactly_per_round() {
        let mut picker = Picker::new(&[8, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..10 * 50 {
            counts[picker.next_index()] += 1;
        }
        assert_eq!(counts, [400, 50, 50]);
        // Smooth: the rare entries are not adjacent within one round.
        let mut picker = Picker::new(&[8, 1, 1]);
        let round: Vec<usize> = (0..10).map(|_| picker.next_index()).collect();
        let rare: Vec<usize> = round
            .iter()
            .enumerate()
            .filter(|(_, &i)| i != 0)
            .map(|(pos, _)| pos)
            .collect();
        assert_eq!(rare.len(), 2);
        assert!(rare[1] - rare[0] > 1, "{round:?}");
    }

    #[test]
    fn builtin_exec_request_is_valid_http_and_json() {
        let headers = Headers {
            host: "127.0.0.1:8080".into(),
            api_key: Some("k1".into()),
            extra: vec![],
        };
        let template = build_template(&RequestSpec::builtin("print").unwrap(), &headers).unwrap();
        let text = std::str::from_utf8(&template.bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/exec HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(head.contains("\r\nAuthorization: Bearer k1"));
        assert!(head.contains("\r\nContent-Type: application/json"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "print(1+1)");
        assert_eq!(json["language"], "python");
        for name in BUILTIN_NAMES {
            let template = build_template(&RequestSpec::builtin(name).unwrap(), &headers).unwrap();
            let mut parsed_headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut parsed_headers);
            assert!(
                request.parse(&template.bytes).unwrap().is_complete(),
                "{name}"
            );
        }
    }

    #[test]
    fn get_has_no_body_headers_and_extra_headers_are_sent() {
        let headers = Headers {
            host: "h".into(),
            api_key: None,
            extra: vec![parse_header("X-Test: 1").unwrap()],
        };
        let template = build_template(&RequestSpec::builtin("health").unwrap(), &headers).unwrap();
        let text = std::str::from_utf8(&template.bytes).unwrap();
        assert_eq!(text, format!("GET /v1/health HTTP/1.1\r\nHost: h\r\nUser-Agent: kvmfork-loadgen/{}\r\nX-Test: 1\r\n\r\n", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn headers_are_validated() {
        assert!(parse_header("NoColon").is_err());
        assert!(parse_header("Bad Name: x").is_err());
        assert!(matches!(
            parse_header("Content-Length: 3"),
            Err(WorkloadError::ManagedHeader(_))
        ));
        let bad_path = RequestSpec {
            path: "/a b".into(),
            ..RequestSpec::builtin("health").unwrap()
        };
        assert!(build_template(&bad_path, &Headers::default()).is_err());
    }
}
