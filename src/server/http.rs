//! HTTP/1.1 request-head parsing (on top of `httparse`) and response
//! serialisation. Pure functions over byte slices: no I/O, so both event
//! loops share them and the property tests can feed them arbitrary bytes.

use std::fmt::Write as _;

/// Size limits applied while parsing a request head.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Request line plus all header lines, including the blank line.
    pub max_head_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Delete,
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Other => "OTHER",
        }
    }
}

/// The parts of a request head the server acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// Request target without the query string.
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Whether the client allows the connection to stay open afterwards.
    pub keep_alive: bool,
    /// Declared `Content-Length` (0 when absent).
    pub content_length: u64,
    pub expect_continue: bool,
    /// The token of an `Authorization: Bearer <token>` header.
    pub bearer: Option<Vec<u8>>,
    /// Bytes of the buffer taken by the head.
    pub head_len: usize,
}

/// Why a request head was refused; each maps to one status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {0} bytes or more than the allowed header count")]
    TooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("Transfer-Encoding request bodies are not supported; send Content-Length")]
    LengthRequired,
    #[error("unsupported Expect value")]
    ExpectationFailed,
}

impl HeadError {
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) => 431,
            HeadError::Malformed(_) => 400,
            HeadError::LengthRequired => 411,
            HeadError::ExpectationFailed => 417,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            HeadError::TooLarge(_) => "headers_too_large",
            HeadError::Malformed(_) => "bad_request",
            HeadError::LengthRequired => "length_required",
            HeadError::ExpectationFailed => "expectation_failed",
        }
    }
}

/// Parses one request head from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; the caller enforces
/// `max_head_bytes` on incomplete heads with [`head_too_large`].
pub fn parse_head(buf: &[u8], limits: HeadLimits) -> Result<Option<RequestHead>, HeadError> {
    // httparse skips blank lines before the request line (RFC 9112 §2.2),
    // which some clients send between pipelined requests.
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge(limits.max_head_bytes))
        }
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if head_len > limits.max_head_bytes {
        return Err(HeadError::TooLarge(limits.max_head_bytes));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        Some("DELETE") => Method::Delete,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();
    let minor_version = req.version.unwrap_or(1);

    let mut keep_alive = minor_version >= 1;
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    let mut bearer = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = parse_content_length(h.value)?;
            if content_length.is_some_and(|prev| prev != value) {
                return Err(HeadError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::LengthRequired);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = trim_ascii(token);
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor_version == 0 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if trim_ascii(h.value).eq_ignore_ascii_case(b"100-continue") {
                // HTTP/1.0 clients do not understand 100 Continue (RFC 9110 §10.1.1).
                expect_continue = minor_version >= 1;
            } else {
                return Err(HeadError::ExpectationFailed);
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            let value = trim_ascii(h.value);
            if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
                bearer = Some(trim_ascii(&value[7..]).to_vec());
            }
        }
    }
    Ok(Some(RequestHead {
        method,
        path,
        minor_version,
        keep_alive,
        content_length: content_length.unwrap_or(0),
        expect_continue,
        bearer,
        head_len,
    }))
}

/// True when an incomplete head already exceeds the limit: the client is
/// sending oversized headers (or no HTTP at all) and must be refused.
pub fn head_too_large(buffered: &[u8], limits: HeadLimits) -> bool {
    buffered.len() > limits.max_head_bytes
}

/// Bytes of blank lines (`\r\n` or `\n`) at the start of `buf`, which
/// may precede a request line (RFC 9112 §2.2) and are skipped.
pub fn leading_blank_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match &buf[i..] {
            [b'\n', ..] => i += 1,
            [b'\r', b'\n', ..] => i += 2,
            _ => return i,
        }
    }
}

/// Where an incremental search for the end of a request head stands, so
/// that each received byte is examined a bounded number of times instead of
/// the whole buffer being parsed again on every read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadScan {
    /// Bytes of the buffer searched so far.
    pub scanned: usize,
    /// A line end was seen: the request line is complete.
    pub line_end_seen: bool,
}

impl HeadScan {
    /// Searches `buf` (which starts with a request line, blank lines
    /// skipped) for the blank line ending the head, continuing where the
    /// last call stopped. Returns the head's length once complete.
    pub fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        // A line end in the last two bytes searched could not be told apart
        // from a head end (`\n\n` or `\n\r\n`) then: look at it again.
        let mut i = self.scanned.saturating_sub(2).min(buf.len());
        while let Some(offset) = buf[i..].iter().position(|&b| b == b'\n') {
            let nl = i + offset;
            self.line_end_seen = true;
            let end = match &buf[nl + 1..] {
                [b'\n', ..] => nl + 2,
                [b'\r', b'\n', ..] => nl + 3,
                _ => {
                    i = nl + 1;
                    continue;
                }
            };
            // Should the parser still want more, the next search starts
            // after this end rather than finding it again.
            self.scanned = end + 2;
            return Some(end);
        }
        self.scanned = buf.len();
        None
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let value = trim_ascii(value);
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed("invalid Content-Length".into()));
    }
    // A value that overflows is certainly above any body limit.
    Ok(value
        .iter()
        .try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(u64::MAX))
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub const JSON: &str = "application/json";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A complete response, serialised by [`Response::write_to`].
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type: JSON,
            headers: Vec::new(),
            body,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Appends the response to `out`. `keep_alive` false adds `Connection: close`.
    /// `head_only` omits the body (responses to HEAD).
    pub fn write_to(&self, out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
        let mut head = String::with_capacity(160);
        // Writing into a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nServer: kvmfork\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head_bytes: 8192,
        max_headers: 32,
    };

    #[test]
    fn parses_a_post_with_body_length_and_bearer() {
        let raw = b"POST /v1/exec?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAuthorization: Bearer  k1 \r\n\r\n{\"code\":\"1\"}";
        let head = parse_head(raw, LIMITS).unwrap().unwrap();
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.path, "/v1/exec");
        assert_eq!(head.content_length, 12);
        assert!(head.keep_alive);
        assert_eq!(head.bearer.as_deref(), Some(&b"k1"[..]));
        assert_eq!(&raw[head.head_len..], b"{\"code\":\"1\"}");
    }

    #[test]
    fn partial_head_needs_more_bytes() {
        assert_eq!(
            parse_head(b"GET /v1/health HTTP/1.1\r\nHost:", LIMITS),
            Ok(None)
        );
    }

    #[test]
    fn connection_semantics_follow_the_version() {
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n", LIMITS)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", LIMITS)
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n", LIMITS)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn refuses_transfer_encoding_and_bad_lengths() {
        let te = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(te, LIMITS), Err(HeadError::LengthRequired));
        let bad = b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n";
        assert!(matches!(
            parse_head(bad, LIMITS),
            Err(HeadError::Malformed(_))
        ));
        let two = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(
            parse_head(two, LIMITS),
            Err(HeadError::Malformed(_))
        ));
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(
            parse_head(huge, LIMITS).unwrap().unwrap().content_length,
            u64::MAX
        );
    }

    #[test]
    fn expect_handling() {
        let h = parse_head(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", LIMITS)
            .unwrap()
            .unwrap();
        assert!(h.expect_continue);
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nExpect: something\r\n\r\n", LIMITS),
            Err(HeadError::ExpectationFailed)
        );
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&raw, LIMITS), Err(HeadError::TooLarge(8192)));
    }

    #[test]
    fn response_serialisation() {
        let mut out = Vec::new();
        Response::json(429, b"{}".to_vec())
            .with_header("Retry-After", "2")
            .write_to(&mut out, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Retry-After: 2\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn parse_head_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Some(head)) = parse_head(&bytes, LIMITS) {
                prop_assert!(head.head_len <= bytes.len());
            }
        }

        #[test]
        fn parse_head_never_panics_on_near_http(
            method in "(GET|POST|HEAD|PUT)",
            path in "/[ -~]{0,40}",
            headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..12),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut raw = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
            for (n, v) in &headers {
                raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            let _ = parse_head(&raw, LIMITS);
        }
    }
}
