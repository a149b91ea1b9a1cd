//! Incremental HTTP/1.1 response parser for one request at a time (no
//! pipelining): Content-Length bodies, chunked bodies with trailers,
//! read-until-close bodies, interim 1xx responses, and the keep-alive rules
//! of HTTP/1.0 and 1.1. Body bytes are counted and dropped, never kept.

use thiserror::Error;

/// Largest response head we accept; anything bigger is treated as garbage.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest chunk-size line or trailer block we buffer.
const MAX_LINE_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid Content-Length header")]
    ContentLength,
    #[error("malformed chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkTerminator,
    #[error("chunk trailer section too large")]
    TrailerTooLarge,
    #[error("{0} unexpected bytes after a complete response (pipelining is off)")]
    TrailingData(usize),
    #[error("connection closed after {0} bytes of an incomplete response")]
    Truncated(u64),
}

/// A fully received response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
    /// Body bytes after transfer decoding.
    pub body_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Waiting for a `size[;ext]\r\n` line.
    Size,
    Data {
        remaining: u64,
    },
    /// The CRLF after a chunk's data; `seen` bytes of it already consumed.
    DataEnd {
        seen: u8,
    },
    /// After the last (zero) chunk: trailer lines until an empty line.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Fixed { remaining: u64 },
    Chunked(ChunkState),
    UntilClose,
    Done,
}

/// Parses one response; [`ResponseParser::reset`] prepares it for the next.
#[derive(Debug)]
pub struct ResponseParser {
    state: State,
    /// Bytes not yet consumed (partial head, partial chunk line).
    pending: Vec<u8>,
    head_request: bool,
    status: u16,
    keep_alive: bool,
    body_bytes: u64,
    received: u64,
}

impl Default for ResponseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseParser {
    pub fn new() -> Self {
        ResponseParser {
            state: State::Head,
            pending: Vec::with_capacity(1024),
            head_request: false,
            status: 0,
            keep_alive: false,
            body_bytes: 0,
            received: 0,
        }
    }

    /// Starts a new response; `head_request` says the request was HEAD, whose
    /// response has no body whatever its headers say.
    pub fn reset(&mut self, head_request: bool) {
        self.state = State::Head;
        self.pending.clear();
        self.head_request = head_request;
        self.status = 0;
        self.keep_alive = false;
        self.body_bytes = 0;
        self.received = 0;
    }

    /// Bytes received for the current response so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feeds bytes read from the socket. Returns the response once complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Response>, HttpError> {
        if data.is_empty() {
            return Ok(None);
        }
        self.received += data.len() as u64;
        if self.state == State::Done {
            return Err(HttpError::TrailingData(data.len()));
        }
        // Work on the pending bytes plus the new ones. Bodies are consumed
        // straight from `data` when nothing is pending, so large bodies are
        // never copied.
        let mut owned;
        let mut input: &[u8] = if self.pending.is_empty() {
            data
        } else {
            owned = std::mem::take(&mut self.pending);
            owned.extend_from_slice(data);
            &owned[..]
        };
        loop {
            let consumed = self.step(input)?;
            input = &input[consumed..];
            if self.state == State::Done {
                if !input.is_empty() {
                    return Err(HttpError::TrailingData(input.len()));
                }
                return Ok(Some(self.response()));
            }
            if consumed == 0 || input.is_empty() {
                break;
            }
        }
        if !input.is_empty() {
            self.pending.extend_from_slice(input);
        }
        Ok(None)
    }

    /// The peer closed the connection. Returns the response if a
    /// read-until-close body just ended, `Ok(None)` if not one byte of the
    /// response arrived, or an error for a truncated response.
    pub fn finish_on_eof(&mut self) -> Result<Option<Response>, HttpError> {
        match self.state {
            State::UntilClose => {
                self.state = State::Done;
                Ok(Some(self.response()))
            }
            State::Head if self.received == 0 => Ok(None),
            State::Done => Ok(None),
            _ => Err(HttpError::Truncated(self.received)),
        }
    }

    fn response(&self) -> Response {
        Response {
            status: self.status,
            keep_alive: self.keep_alive,
            body_bytes: self.body_bytes,
        }
    }

    /// Consumes a prefix of `input` for the current state; 0 means "need more".
    fn step(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        match self.state {
            State::Head => self.parse_head(input),
            State::Fixed { remaining } => {
                let take = remaining.min(input.len() as u64);
                self.body_bytes += take;
                let left = remaining - take;
                self.state = if left == 0 {
                    State::Done
                } else {
                    State::Fixed { remaining: left }
                };
                Ok(take as usize)
            }
            State::UntilClose => {
                self.body_bytes += input.len() as u64;
                Ok(input.len())
            }
            State::Chunked(chunk) => self.step_chunked(chunk, input),
            State::Done => Ok(0),
        }
    }

    fn parse_head(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if input.len() > MAX_HEAD_BYTES {
                    return Err(HttpError::HeadTooLarge);
                }
                return Ok(0);
            }
            Err(e) => return Err(HttpError::Head(e.to_string())),
        };
        let status = parsed.code.unwrap_or(0);
        let http11 = parsed.version == Some(1);
        let mut content_length: Option<u64> = None;
        let mut chunked = false;
        let mut conn_close = false;
        let mut conn_keep_alive = false;
        for header in parsed.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(HttpError::ContentLength)?;
                // Differing duplicates are a smuggling vector: refuse them.
                if content_length.is_some_and(|previous| previous != value) {
                    return Err(HttpError::ContentLength);
                }
                content_length = Some(value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked must be the last coding to frame the body.
                let value = String::from_utf8_lossy(header.value);
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in String::from_utf8_lossy(header.value).split(',') {
                    let token = token.trim();
                    conn_close |= token.eq_ignore_ascii_case("close");
                    conn_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
        }
        if (100..200).contains(&status) {
            // Interim response (100 Continue, 103 Early Hints): the real one follows.
            return Ok(head_len);
        }
        self.status = status;
        self.keep_alive = if http11 {
            !conn_close
        } else {
            conn_keep_alive && !conn_close
        };
        let bodiless = self.head_request || status == 204 || status == 304;
        self.state = if bodiless {
            State::Done
        } else if chunked {
            State::Chunked(ChunkState::Size)
        } else if let Some(length) = content_length {
            if length == 0 {
                State::Done
            } else {
                State::Fixed { remaining: length }
            }
        } else {
            // No framing: the body runs until the server closes.
            self.keep_alive = false;
            State::UntilClose
        };
        Ok(head_len)
    }

    fn step_chunked(&mut self, chunk: ChunkState, input: &[u8]) -> Result<usize, HttpError> {
        match chunk {
            ChunkState::Size => match httparse::parse_chunk_size(input) {
                Ok(httparse::Status::Complete((used, size))) => {
                    self.state = State::Chunked(if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data { remaining: size }
                    });
                    Ok(used)
                }
                Ok(httparse::Status::Partial) => {
                    if input.len() > MAX_LINE_BYTES {
                        return Err(HttpError::ChunkSize);
                    }
                    Ok(0)
                }
                Err(_) => Err(HttpError::ChunkSize),
            },
            ChunkState::Data { remaining } => {
                let take = remaining.min(input.len() as u64);
                self.body_bytes += take;
                let left = remaining - take;
                self.state = State::Chunked(if left == 0 {
                    ChunkState::DataEnd { seen: 0 }
                } else {
                    ChunkState::Data { remaining: left }
                });
                Ok(take as usize)
            }
            ChunkState::DataEnd { seen } => {
                let expected = &b"\r\n"[seen as usize..];
                let take = expected.len().min(input.len());
                if input[..take] != expected[..take] {
                    return Err(HttpError::ChunkTerminator);
                }
                let seen = seen + take as u8;
                self.state = State::Chunked(if seen == 2 {
                    ChunkState::Size
                } else {
                    ChunkState::DataEnd { seen }
                });
                Ok(take)
            }
            ChunkState::Trailers => {
                // Trailer lines end with an empty line; with no trailers the
                // input starts with that empty line.
                if input.starts_with(b"\r\n") {
                    self.state = State::Done;
                    return Ok(2);
                }
                if input.len() < 2 {
                    return Ok(0);
                }
                match find_subslice(input, b"\r\n\r\n") {
                    Some(end) => {
                        self.state = State::Done;
                        Ok(end + 4)
                    }
                    None if input.len() > MAX_LINE_BYTES => Err(HttpError::TrailerTooLarge),
                    None => Ok(0),
                }
            }
        }
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` split at every possible boundary and checks that each
    /// split yields the same response exactly at the end.
    fn parse_split_everywhere(bytes: &[u8], head_request: bool) -> Response {
        let mut whole = ResponseParser::new();
        whole.reset(head_request);
        let expected = whole.feed(bytes).unwrap().expect("complete in one piece");
        for split in 1..bytes.len() {
            let mut parser = ResponseParser::new();
            parser.reset(head_request);
            assert_eq!(parser.feed(&bytes[..split]).unwrap(), None, "split {split}");
            assert_eq!(
                parser.feed(&bytes[split..]).unwrap(),
                Some(expected),
                "split {split}"
            );
        }
        // Byte by byte.
        let mut parser = ResponseParser::new();
        parser.reset(head_request);
        let mut result = None;
        for (i, byte) in bytes.iter().enumerate() {
            let got = parser.feed(std::slice::from_ref(byte)).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(got, None, "byte {i}");
            } else {
                result = got;
            }
        }
        assert_eq!(result, Some(expected));
        expected
    }

    #[test]
    fn content_length_body_at_every_split() {
        let response = parse_split_everywhere(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
            false,
        );
        assert_eq!(
            response,
            Response {
                status: 200,
                keep_alive: true,
                body_bytes: 11
            }
        );
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers_at_every_split() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n";
        let response = parse_split_everywhere(bytes, false);
        assert_eq!(
            response,
            Response {
                status: 200,
                keep_alive: true,
                body_bytes: 11
            }
        );
    }

    #[test]
    fn chunked_body_without_trailers() {
        let bytes = b"HTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let response = parse_split_everywhere(bytes, false);
        assert_eq!(
            response,
            Response {
                status: 201,
                keep_alive: true,
                body_bytes: 3
            }
        );
    }

    #[test]
    fn connection_close_and_http10_rules() {
        let close = parse_split_everywhere(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            false,
        );
        assert!(!close.keep_alive);
        let http10 =
            parse_split_everywhere(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false);
        assert!(!http10.keep_alive);
        let http10_ka = parse_split_everywhere(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
            false,
        );
        assert!(http10_ka.keep_alive);
    }

    #[test]
    fn body_until_close() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        assert_eq!(
            parser.feed(b"HTTP/1.0 200 OK\r\n\r\npartial body").unwrap(),
            None
        );
        assert_eq!(parser.feed(b" more").unwrap(), None);
        let response = parser.finish_on_eof().unwrap().unwrap();
        assert_eq!(
            response,
            Response {
                status: 200,
                keep_alive: false,
                body_bytes: 17
            }
        );
    }

    #[test]
    fn bodiless_responses() {
        let head = parse_split_everywhere(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", true);
        assert_eq!(head.body_bytes, 0);
        let no_content = parse_split_everywhere(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(no_content.status, 204);
        assert!(no_content.keep_alive);
    }

    #[test]
    fn interim_100_continue_is_skipped() {
        let response = parse_split_everywhere(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nerr",
            false,
        );
        assert_eq!(response.status, 500);
        assert_eq!(response.body_bytes, 3);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        assert!(matches!(
            parser.feed(b"\x00\x01garbage\r\n\r\n"),
            Err(HttpError::Head(_))
        ));
    }

    #[test]
    fn conflicting_content_lengths_are_refused() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        let result =
            parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok");
        assert_eq!(result, Err(HttpError::ContentLength));
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        let result = parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert_eq!(result, Err(HttpError::ChunkSize));
        parser.reset(false);
        let result = parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY");
        assert_eq!(result, Err(HttpError::ChunkTerminator));
    }

    #[test]
    fn bytes_after_complete_response_are_an_error() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        let result = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA");
        assert_eq!(result, Err(HttpError::TrailingData(5)));
    }

    #[test]
    fn eof_before_and_during_response() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        assert_eq!(parser.finish_on_eof(), Ok(None));
        parser.reset(false);
        parser
            .feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        assert!(matches!(
            parser.finish_on_eof(),
            Err(HttpError::Truncated(_))
        ));
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut parser = ResponseParser::new();
        parser.reset(false);
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() <= MAX_HEAD_BYTES {
            head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        // Too many headers or too large: either way an error, never a hang.
        assert!(parser.feed(&head).is_err());
    }
}
