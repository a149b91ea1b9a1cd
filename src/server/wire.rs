//! JSON bodies of the /v1 API: decoding exec requests and encoding results
//! and errors. Zeroboot-compatible field names.
//!
//! Exec response shape (also inside `{"results": [...]}` for batches):
//!
//! ```json
//! {"id": "…", "stdout": "…", "stderr": "…", "exit_code": 0,
//!  "fork_time_ms": 0.8, "exec_time_ms": 12.1, "total_time_ms": 13.0,
//!  "output": "<same as stdout>", "duration_ms": 13.0,
//!  "timed_out": false, "stdout_truncated": false, "stderr_truncated": false,
//!  "error": null}
//! ```
//!
//! A run that hits its timeout is still a 200 response: `timed_out: true`,
//! `exit_code: -1`, `error: {"code": "timeout", "message": …}`, with whatever
//! output the guest produced before it was stopped. Guest failures (crash,
//! bad response, memory limit) likewise answer 200 with `exit_code: -1` and
//! `error.code` one of `guest_crashed`, `bad_response`, `memory_limit`,
//! `cancelled`, `rejected`, `no_template`, `internal`.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{ExecFailure, ExecResult, Language};

/// An error answered as `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    pub fn to_json(&self) -> Vec<u8> {
        error_json(self.code, &self.message)
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

pub fn error_json(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorEnvelope {
        error: ErrorBody { code, message },
    })
    .expect("serialising strings cannot fail")
}

/// Rules applied while decoding exec requests.
#[derive(Clone, Debug)]
pub struct DecodeRules {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub max_batch: usize,
    /// Most wall time a batch may ask for: its items' timeouts added up.
    pub max_batch_time: Duration,
    /// Languages with a loaded template.
    pub languages: Vec<Language>,
}

/// A validated exec request, before it gets a cancel token.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecSpec {
    pub code: String,
    pub language: Language,
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct ExecIn {
    code: Option<String>,
    language: Option<String>,
    timeout_seconds: Option<f64>,
}

#[derive(Deserialize)]
struct BatchIn {
    executions: Option<Vec<serde_json::Value>>,
}

pub fn decode_exec(body: &[u8], rules: &DecodeRules) -> Result<ExecSpec, ApiError> {
    let parsed: ExecIn = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?;
    validate(parsed, rules)
}

pub fn decode_batch(body: &[u8], rules: &DecodeRules) -> Result<Vec<ExecSpec>, ApiError> {
    let parsed: BatchIn = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?;
    let items = parsed.executions.ok_or_else(|| {
        ApiError::bad_request("missing_executions", "field `executions` is required")
    })?;
    if items.len() > rules.max_batch {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "a batch holds at most {} executions, got {}",
                rules.max_batch,
                items.len()
            ),
        ));
    }
    let specs: Vec<ExecSpec> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let parsed: ExecIn = serde_json::from_value(item).map_err(|e| {
                ApiError::bad_request("invalid_json", format!("executions[{i}]: {e}"))
            })?;
            validate(parsed, rules).map_err(|mut e| {
                e.message = format!("executions[{i}]: {}", e.message);
                e
            })
        })
        .collect::<Result<_, _>>()?;
    check_batch_time(specs.iter().map(|s| s.timeout), rules)?;
    Ok(specs)
}

/// Refuses a batch whose items' timeouts add up to more than
/// `max_batch_time`: one request may not book worker time without bound
/// (64 items x 300 s would be over five hours).
pub fn check_batch_time(
    timeouts: impl Iterator<Item = Duration>,
    rules: &DecodeRules,
) -> Result<(), ApiError> {
    let total: Duration = timeouts.fold(Duration::ZERO, |a, t| a.saturating_add(t));
    if total > rules.max_batch_time {
        return Err(ApiError::bad_request(
            "batch_time_exceeded",
            format!(
                "a batch's timeout_seconds (the default for items without one) add up to at most {} s, got {} s",
                rules.max_batch_time.as_secs_f64(),
                total.as_secs_f64()
            ),
        ));
    }
    Ok(())
}

fn validate(parsed: ExecIn, rules: &DecodeRules) -> Result<ExecSpec, ApiError> {
    let code = parsed
        .code
        .ok_or_else(|| ApiError::bad_request("missing_code", "field `code` is required"))?;
    let language = match parsed.language.as_deref() {
        None => Language::Python,
        Some(name) => Language::from_wire(name).ok_or_else(|| {
            ApiError::bad_request("unknown_language", format!("unknown language `{name}`"))
        })?,
    };
    if !rules.languages.contains(&language) {
        return Err(ApiError::bad_request(
            "unknown_language",
            format!("this server does not serve language `{}` (see `languages` and `templates` in GET /v1/health)", language.as_str()),
        ));
    }
    let timeout = exec_timeout(parsed.timeout_seconds, rules)?;
    Ok(ExecSpec {
        code,
        language,
        timeout,
    })
}

/// `timeout_seconds` of an exec request: the default when absent, else a
/// number > 0 and <= the maximum.
pub fn exec_timeout(secs: Option<f64>, rules: &DecodeRules) -> Result<Duration, ApiError> {
    match secs {
        None => Ok(rules.default_timeout),
        Some(secs) if secs.is_finite() && secs > 0.0 && secs <= rules.max_timeout.as_secs_f64() => {
            // Below a millisecond a timeout cannot be enforced meaningfully.
            Ok(Duration::from_secs_f64(secs).max(Duration::from_millis(1)))
        }
        Some(secs) => Err(ApiError::bad_request(
            "invalid_timeout",
            format!(
                "timeout_seconds must be a number > 0 and <= {}, got {secs}",
                rules.max_timeout.as_secs_f64()
            ),
        )),
    }
}

#[derive(Serialize)]
struct ExecOut<'a> {
    id: &'a str,
    stdout: &'a str,
    stderr: &'a str,
    exit_code: i32,
    fork_time_ms: f64,
    exec_time_ms: f64,
    total_time_ms: f64,
    output: &'a str,
    duration_ms: f64,
    timed_out: bool,
    stdout_truncated: bool,
    stderr_truncated: bool,
    error: Option<ErrorBody<'a>>,
}

/// Logs the detail of an internal (host-side) failure on the server's
/// stderr under `request_id` and returns the message the client gets
/// instead: host error text (KVM, mmap, fork errors) stays on the host.
pub fn internal_error(request_id: &str, detail: &str) -> String {
    eprintln!("kvmfork serve: internal error (request id {request_id}): {detail}");
    internal_message(request_id)
}

/// The client-facing message of an internal error.
pub fn internal_message(request_id: &str) -> String {
    format!("internal error; request id {request_id}")
}

/// `error.code` and message for a failed run; `id` names an internal
/// failure, whose detail is logged rather than answered.
pub fn failure_code<'a>(failure: &'a ExecFailure, id: &str) -> (&'static str, Cow<'a, str>) {
    match failure {
        ExecFailure::Timeout => (
            "timeout",
            "the execution exceeded its timeout and was stopped".into(),
        ),
        ExecFailure::Cancelled => ("cancelled", "the execution was cancelled".into()),
        ExecFailure::GuestCrashed(m) => ("guest_crashed", m.as_str().into()),
        ExecFailure::BadResponse(m) => ("bad_response", m.as_str().into()),
        ExecFailure::MemoryLimit => (
            "memory_limit",
            "the sandbox exceeded its memory limit".into(),
        ),
        ExecFailure::Rejected(m) => ("rejected", m.as_str().into()),
        ExecFailure::NoTemplate => (
            "no_template",
            "no template is loaded for this language".into(),
        ),
        ExecFailure::Internal(m) => ("internal", internal_error(id, m).into()),
    }
}

fn millis(d: Duration) -> f64 {
    // Microsecond resolution keeps the JSON short.
    (d.as_micros() as f64) / 1000.0
}

/// Length of `s` once JSON-escaped as serde_json writes it, quotes not
/// counted: `"`, `\\` and `\b \t \n \f \r` take two bytes, other control
/// characters six (`\u0001`), everything else its UTF-8 length.
pub fn escaped_len(s: &str) -> usize {
    s.bytes().map(escaped_byte_len).sum()
}

fn escaped_byte_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// The longest prefix of `s`, ending on a character boundary, whose
/// escaped length is at most `budget`.
fn escaped_prefix(s: &str, budget: usize) -> &str {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let mut buf = [0u8; 4];
        let cost: usize = c.encode_utf8(&mut buf).bytes().map(escaped_byte_len).sum();
        if used + cost > budget {
            return &s[..i];
        }
        used += cost;
    }
    s
}

/// Max-min fair shares of `cap` between `demands`: everyone gets their
/// demand when they all fit; otherwise every demand is cut to one common
/// level, chosen so the shares add up to at most `cap`.
pub fn fair_shares(demands: &[usize], cap: usize) -> Vec<usize> {
    let total = demands.iter().fold(0usize, |a, &d| a.saturating_add(d));
    if total <= cap {
        return demands.to_vec();
    }
    let mut sorted = demands.to_vec();
    sorted.sort_unstable();
    let mut left = cap;
    let mut level = 0;
    for (i, &d) in sorted.iter().enumerate() {
        let others = sorted.len() - i;
        if d.saturating_mul(others) > left {
            level = left / others;
            break;
        }
        left -= d;
    }
    demands.iter().map(|&d| d.min(level)).collect()
}

/// Bytes an exec result's `stdout`, `output` (the same text again) and
/// `stderr` take in a response, escaped.
fn output_demand(result: &ExecResult) -> usize {
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    escaped_len(&stdout)
        .saturating_mul(2)
        .saturating_add(escaped_len(&stderr))
}

/// Each result's share of a response's output budget (`cap` bytes of
/// escaped stdout, output and stderr across all of them): whole outputs
/// when they fit, else fair shares, so one noisy item cannot crowd out
/// the others of a batch.
pub fn output_shares<'a>(
    results: impl IntoIterator<Item = &'a ExecResult>,
    cap: usize,
) -> Vec<usize> {
    let demands: Vec<usize> = results.into_iter().map(output_demand).collect();
    fair_shares(&demands, cap)
}

/// Serialises one exec result as a JSON object into `out`, its escaped
/// `stdout` + `output` + `stderr` cut to at most `share` bytes (a cut
/// output is flagged `stdout_truncated` / `stderr_truncated`).
pub fn write_exec_result(out: &mut Vec<u8>, id: &str, result: &ExecResult, share: usize) {
    let stdout_full = String::from_utf8_lossy(&result.stdout);
    let stderr_full = String::from_utf8_lossy(&result.stderr);
    // stdout is written twice (`stdout` and Zeroboot's `output`).
    let split = fair_shares(
        &[
            escaped_len(&stdout_full).saturating_mul(2),
            escaped_len(&stderr_full),
        ],
        share,
    );
    let stdout = escaped_prefix(&stdout_full, split[0] / 2);
    let stderr = escaped_prefix(&stderr_full, split[1]);
    let error = result.failure.as_ref().map(|f| failure_code(f, id));
    let exec = ExecOut {
        id,
        stdout,
        stderr,
        exit_code: if result.failure.is_some() {
            -1
        } else {
            result.exit_code
        },
        fork_time_ms: millis(result.fork_time),
        exec_time_ms: millis(result.exec_time),
        total_time_ms: millis(result.total_time),
        output: stdout,
        duration_ms: millis(result.total_time),
        timed_out: result.failure == Some(ExecFailure::Timeout),
        stdout_truncated: result.stdout_truncated || stdout.len() < stdout_full.len(),
        stderr_truncated: result.stderr_truncated || stderr.len() < stderr_full.len(),
        error: error
            .as_ref()
            .map(|(code, message)| ErrorBody { code, message }),
    };
    serde_json::to_writer(out, &exec).expect("serialising into a Vec cannot fail");
}

/// `{"results": [...]}` of a batch, its outputs within `cap` together.
pub fn write_batch(
    out: &mut Vec<u8>,
    results: &[ExecResult],
    ids: &mut dyn FnMut() -> String,
    cap: usize,
) {
    let shares = output_shares(results, cap);
    out.extend_from_slice(br#"{"results":["#);
    for (i, (result, share)) in results.iter().zip(shares).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_exec_result(out, &ids(), result, share);
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> DecodeRules {
        DecodeRules {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_batch: 4,
            max_batch_time: Duration::from_secs(100),
            languages: vec![Language::Python],
        }
    }

    #[test]
    fn decodes_defaults() {
        let spec = decode_exec(br#"{"code":"print(1)","extra":true}"#, &rules()).unwrap();
        assert_eq!(spec.code, "print(1)");
        assert_eq!(spec.language, Language::Python);
        assert_eq!(spec.timeout, Duration::from_secs(30));
    }

    #[test]
    fn error_codes() {
        let r = rules();
        assert_eq!(decode_exec(b"{", &r).unwrap_err().code, "invalid_json");
        assert_eq!(decode_exec(b"{}", &r).unwrap_err().code, "missing_code");
        assert_eq!(
            decode_exec(br#"{"code":1}"#, &r).unwrap_err().code,
            "invalid_json"
        );
        assert_eq!(
            decode_exec(br#"{"code":"x","language":"cobol"}"#, &r)
                .unwrap_err()
                .code,
            "unknown_language"
        );
        assert_eq!(
            decode_exec(br#"{"code":"x","language":"node"}"#, &r)
                .unwrap_err()
                .code,
            "unknown_language"
        );
        for t in ["0", "-1", "301", "1e400", "\"5\""] {
            let body = format!(r#"{{"code":"x","timeout_seconds":{t}}}"#);
            let err = decode_exec(body.as_bytes(), &r).unwrap_err();
            assert!(
                err.code == "invalid_timeout" || err.code == "invalid_json",
                "{t}: {err:?}"
            );
            assert_eq!(err.status, 400);
        }
        let ok = decode_exec(br#"{"code":"x","timeout_seconds":0.5}"#, &r).unwrap();
        assert_eq!(ok.timeout, Duration::from_millis(500));
        let tiny = decode_exec(br#"{"code":"x","timeout_seconds":1e-9}"#, &r).unwrap();
        assert_eq!(tiny.timeout, Duration::from_millis(1));
    }

    #[test]
    fn batch_decoding() {
        let r = rules();
        let specs = decode_batch(
            br#"{"executions":[{"code":"a"},{"code":"b","language":"py"}]}"#,
            &r,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].code, "b");
        let err = decode_batch(br#"{"executions":[{"code":"a"},{}]}"#, &r).unwrap_err();
        assert_eq!(err.code, "missing_code");
        assert!(err.message.starts_with("executions[1]"), "{}", err.message);
        assert_eq!(
            decode_batch(b"{}", &r).unwrap_err().code,
            "missing_executions"
        );
        // Timeouts add up: 3 x 30 s fits 100 s, a fourth does not.
        let item = r#"{"code":"a"}"#;
        assert!(decode_batch(
            format!(r#"{{"executions":[{}]}}"#, [item; 3].join(",")).as_bytes(),
            &r
        )
        .is_ok());
        let err = decode_batch(
            format!(r#"{{"executions":[{}]}}"#, [item; 4].join(",")).as_bytes(),
            &r,
        )
        .unwrap_err();
        assert_eq!(err.code, "batch_time_exceeded");
        assert!(err.message.contains("100 s, got 120 s"), "{}", err.message);
        let short = r#"{"code":"a","timeout_seconds":1}"#;
        assert!(decode_batch(
            format!(r#"{{"executions":[{}]}}"#, [short; 4].join(",")).as_bytes(),
            &r
        )
        .is_ok());
        let big = format!(r#"{{"executions":[{}]}}"#, [r#"{"code":"a"}"#; 5].join(","));
        assert_eq!(
            decode_batch(big.as_bytes(), &r).unwrap_err().code,
            "batch_too_large"
        );
    }

    #[test]
    fn timeout_result_shape() {
        let result = ExecResult {
            stdout: b"partial".to_vec(),
            exit_code: 0,
            failure: Some(ExecFailure::Timeout),
            total_time: Duration::from_millis(1500),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_exec_result(&mut out, "id1", &result, usize::MAX);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timed_out"], true);
        assert_eq!(v["exit_code"], -1);
        assert_eq!(v["output"], "partial");
        assert_eq!(v["duration_ms"], 1500.0);
        assert_eq!(v["error"]["code"], "timeout");
    }

    #[test]
    fn internal_failures_answer_a_request_id_not_the_host_detail() {
        let result = ExecResult {
            failure: Some(ExecFailure::Internal(
                "KVM_RUN: Bad address (os error 14) at /dev/kvm".into(),
            )),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_exec_result(&mut out, "id-7", &result, usize::MAX);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("KVM") && !text.contains("/dev"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "internal");
        assert_eq!(v["error"]["message"], "internal error; request id id-7");
    }

    #[test]
    fn escaped_len_matches_serde_json() {
        for text in [
            "",
            "plain",
            "q\"b\\",
            "\n\t\r\u{8}\u{c}",
            "\u{1}\u{1f}\u{7f}",
            "é€😀",
            "a\u{0}b",
        ] {
            let json = serde_json::to_string(text).unwrap();
            assert_eq!(escaped_len(text), json.len() - 2, "{text:?}");
        }
    }

    #[test]
    fn fair_shares_cut_the_largest_demands_to_one_level() {
        assert_eq!(fair_shares(&[1, 2, 3], 10), vec![1, 2, 3]);
        assert_eq!(fair_shares(&[1, 100, 100], 41), vec![1, 20, 20]);
        assert_eq!(fair_shares(&[100, 5, 100, 7], 100), vec![44, 5, 44, 7]);
        assert_eq!(fair_shares(&[usize::MAX, usize::MAX], 10), vec![5, 5]);
        assert_eq!(fair_shares(&[], 10), Vec::<usize>::new());
    }

    #[test]
    fn a_capped_result_fits_its_share_and_says_it_was_cut() {
        let result = ExecResult {
            stdout: vec![1u8; 10_000],
            stderr: "é".repeat(5_000).into_bytes(),
            ..Default::default()
        };
        for share in [0, 7, 100, 4096, 50_000] {
            let mut out = Vec::new();
            write_exec_result(&mut out, "id", &result, share);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let (stdout, stderr) = (v["stdout"].as_str().unwrap(), v["stderr"].as_str().unwrap());
            assert_eq!(v["output"], v["stdout"]);
            let used = 2 * escaped_len(stdout) + escaped_len(stderr);
            assert!(used <= share, "{used} > {share}");
            assert_eq!(v["stdout_truncated"], true);
            // stderr (10 000 bytes) fits whole once half the share does.
            assert_eq!(v["stderr_truncated"], share < 20_000, "share {share}");
        }
        let mut out = Vec::new();
        write_exec_result(&mut out, "id", &result, usize::MAX);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stdout"].as_str().unwrap().len(), 10_000);
        assert_eq!(v["stdout_truncated"], false);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = rules();
            let _ = decode_exec(&bytes, &r);
            let _ = decode_batch(&bytes, &r);
        }

        #[test]
        fn decoders_never_panic_on_json_like(
            code in proptest::option::of("[ -~]{0,20}"),
            lang in proptest::option::of("[a-z]{0,8}"),
            timeout in proptest::option::of(any::<f64>()),
        ) {
            let mut obj = serde_json::Map::new();
            if let Some(c) = code { obj.insert("code".into(), c.into()); }
            if let Some(l) = lang { obj.insert("language".into(), l.into()); }
            if let Some(t) = timeout {
                if let Some(n) = serde_json::Number::from_f64(t) { obj.insert("timeout_seconds".into(), n.into()); }
            }
            let body = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
            if let Ok(spec) = decode_exec(&body, &rules()) {
                prop_assert!(spec.timeout > Duration::ZERO && spec.timeout <= Duration::from_secs(300));
            }
        }
    }
}
