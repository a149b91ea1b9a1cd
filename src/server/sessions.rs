//! The session routes (`/v1/sandboxes…`, `/v1/checkpoints/…`): parsing
//! paths and bodies into [`SessionOp`]s and answers into JSON. The engine
//! runs the operations on the worker that owns the session.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;

use super::wire::{self, ApiError, DecodeRules};
use crate::api::{
    CancelToken, ExecRequest, ExecResult, Language, Owner, SessionError, SessionId, SessionInfo,
    SessionOp, SessionReply, SessionSpec,
};

/// Which session route a request head matched (ids are read from the path
/// again when the body is in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionRoute {
    /// POST /v1/sandboxes
    Create,
    /// GET /v1/sandboxes
    List,
    /// GET /v1/sandboxes/{id}
    Get,
    /// DELETE /v1/sandboxes/{id}
    Delete,
    /// POST /v1/sandboxes/{id}/exec
    Exec,
    /// POST /v1/sandboxes/{id}/fork
    Fork,
    /// POST /v1/sandboxes/{id}/timeout
    Timeout,
    /// POST /v1/sandboxes/{id}/checkpoints
    Checkpoint,
    /// POST /v1/sandboxes/{id}/restore
    Restore,
    /// DELETE /v1/checkpoints/{id}
    DeleteCheckpoint,
    /// POST /v1/exec/batch with `from_sandbox`
    Batch,
}

/// Matches a path (query ignored) and method name to a session route and
/// the methods it allows. None: not a session path.
pub fn route(path: &str, method: &str) -> Option<Result<SessionRoute, &'static str>> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (route, allow) = match parts.as_slice() {
        ["v1", "sandboxes"] => match method {
            "POST" => (Some(SessionRoute::Create), "GET, POST"),
            "GET" => (Some(SessionRoute::List), "GET, POST"),
            _ => (None, "GET, POST"),
        },
        ["v1", "sandboxes", _] => match method {
            "GET" => (Some(SessionRoute::Get), "GET, DELETE"),
            "DELETE" => (Some(SessionRoute::Delete), "GET, DELETE"),
            _ => (None, "GET, DELETE"),
        },
        ["v1", "sandboxes", _, action] => {
            let r = match *action {
                "exec" => SessionRoute::Exec,
                "fork" => SessionRoute::Fork,
                "timeout" => SessionRoute::Timeout,
                "checkpoints" => SessionRoute::Checkpoint,
                "restore" => SessionRoute::Restore,
                _ => return None,
            };
            (if method == "POST" { Some(r) } else { None }, "POST")
        }
        ["v1", "checkpoints", _] => (
            if method == "DELETE" {
                Some(SessionRoute::DeleteCheckpoint)
            } else {
                None
            },
            "DELETE",
        ),
        _ => return None,
    };
    Some(route.ok_or(allow))
}

/// The id segment of a session path, shortened for messages.
pub fn path_sandbox_text(path: &str) -> String {
    truncate(path_id(path))
}

fn path_id(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or(path);
    path.trim_start_matches('/').split('/').nth(2).unwrap_or("")
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn not_found(id: &str) -> ApiError {
    let e = SessionError::not_found(id);
    ApiError::new(e.status, e.code, e.message)
}

/// The session id in the path, or the 404 a client gets for a malformed or
/// foreign one (ids are opaque to clients: any unknown id is "not found").
pub fn sandbox_id(path: &str, node: &str) -> Result<SessionId, ApiError> {
    parse_id(SessionId::SANDBOX, path_id(path), node)
}

fn parse_id(kind: &str, text: &str, node: &str) -> Result<SessionId, ApiError> {
    let id = SessionId::parse(kind, text).ok_or_else(|| {
        if kind == SessionId::CHECKPOINT {
            ApiError::new(
                404,
                "checkpoint_not_found",
                format!("no checkpoint {}", truncate(text)),
            )
        } else {
            not_found(&truncate(text))
        }
    })?;
    if id.node != node {
        return Err(ApiError::new(
            404,
            if kind == SessionId::CHECKPOINT { "checkpoint_not_found" } else { "sandbox_not_found" },
            format!("{} lives on node {}, not on this node ({node}): the load balancer must route by the id's node", id.text, id.node),
        ));
    }
    Ok(id)
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad("invalid_json", format!("invalid JSON body: {e}")))
}

fn ttl(secs: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && (1.0..=1e9).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(s) => Err(bad(
            "invalid_ttl",
            format!("ttl_seconds must be a number >= 1, got {s}"),
        )),
    }
}

fn count(n: Option<u64>, default: usize) -> Result<usize, ApiError> {
    match n {
        None => Ok(default),
        Some(n) if (1..=crate::engine::session::MAX_FORK_COUNT as u64).contains(&n) => {
            Ok(n as usize)
        }
        Some(n) => Err(bad(
            "invalid_count",
            format!(
                "count must be between 1 and {}, got {n}",
                crate::engine::session::MAX_FORK_COUNT
            ),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    language: Option<String>,
    template: Option<String>,
    ttl_seconds: Option<f64>,
    metadata: Option<serde_json::Value>,
    from_checkpoint: Option<String>,
    count: Option<u64>,
}

#[derive(Deserialize, Default)]
struct ExecIn {
    code: Option<String>,
    language: Option<String>,
    timeout_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForkIn {
    count: Option<u64>,
    ttl_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimeoutIn {
    ttl_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreIn {
    checkpoint_id: Option<String>,
}

fn language(name: Option<&str>, rules: &DecodeRules) -> Result<Language, ApiError> {
    let language = match name {
        None => Language::Python,
        Some(n) => Language::from_wire(n).ok_or_else(|| {
            bad(
                "unknown_language",
                format!("unknown language `{}`", truncate(n)),
            )
        })?,
    };
    if !rules.languages.contains(&language) {
        return Err(bad(
            "unknown_language",
            format!("no template is loaded for language `{}`", language.as_str()),
        ));
    }
    Ok(language)
}

/// One session exec's request; the session's own language applies when
/// the body names none.
fn exec_request(
    parsed: ExecIn,
    rules: &DecodeRules,
) -> Result<(ExecRequest, Option<Language>), ApiError> {
    let code = parsed
        .code
        .ok_or_else(|| bad("missing_code", "field `code` is required"))?;
    if code.len() > crate::engine::mailbox::CODE_MAX {
        return Err(ApiError::new(
            413,
            "code_too_large",
            format!(
                "code is {} bytes; the limit is {}",
                code.len(),
                crate::engine::mailbox::CODE_MAX
            ),
        ));
    }
    let language = match parsed.language.as_deref() {
        None => None,
        Some(n) => Some(language(Some(n), rules)?),
    };
    let timeout = wire::exec_timeout(parsed.timeout_seconds, rules)?;
    // Without a language the session's own applies (the engine sets it).
    Ok((
        ExecRequest {
            code,
            language: language.unwrap_or(Language::Python),
            timeout,
            cancel: CancelToken::new(),
        },
        language,
    ))
}

/// The operation a complete session request asks for.
pub fn decode(
    route: SessionRoute,
    path: &str,
    body: &[u8],
    owner: Owner,
    node: &str,
    rules: &DecodeRules,
) -> Result<SessionOp, ApiError> {
    Ok(match route {
        SessionRoute::Create => {
            let b: CreateIn = parse_body(body)?;
            let ttl = ttl(b.ttl_seconds)?;
            let count = count(b.count, 1)?;
            let metadata = b.metadata.unwrap_or(serde_json::Value::Null);
            if !(metadata.is_null() || metadata.is_object()) {
                return Err(bad("invalid_metadata", "metadata must be a JSON object"));
            }
            if serde_json::to_vec(&metadata).map(|v| v.len()).unwrap_or(0) > 16 << 10 {
                return Err(ApiError::new(
                    413,
                    "metadata_too_large",
                    "metadata is limited to 16 KiB of JSON",
                ));
            }
            let from_checkpoint = match b.from_checkpoint.as_deref() {
                Some(c) => Some(parse_id(SessionId::CHECKPOINT, c, node)?),
                None => None,
            };
            let language = match (&b.template, &b.language) {
                (Some(t), _) => language(Some(t), rules)?,
                (None, l) => language(l.as_deref(), rules)?,
            };
            let spec = SessionSpec {
                language,
                ttl,
                metadata,
            };
            SessionOp::Create {
                owner,
                spec,
                from_checkpoint,
                count,
            }
        }
        SessionRoute::Get => SessionOp::Get {
            id: sandbox_id(path, node)?,
            owner,
        },
        SessionRoute::Delete => SessionOp::Delete {
            id: sandbox_id(path, node)?,
            owner,
        },
        SessionRoute::Exec => {
            let id = sandbox_id(path, node)?;
            let parsed: ExecIn = serde_json::from_slice(body)
                .map_err(|e| bad("invalid_json", format!("invalid JSON body: {e}")))?;
            let (req, language) = exec_request(parsed, rules)?;
            SessionOp::Exec {
                id,
                owner,
                req,
                language,
            }
        }
        SessionRoute::Fork => {
            let id = sandbox_id(path, node)?;
            let b: ForkIn = parse_body(body)?;
            SessionOp::Fork {
                id,
                owner,
                count: count(b.count, 1)?,
                ttl: ttl(b.ttl_seconds)?,
            }
        }
        SessionRoute::Timeout => {
            let id = sandbox_id(path, node)?;
            let b: TimeoutIn = parse_body(body)?;
            let ttl = ttl(b.ttl_seconds)?
                .ok_or_else(|| bad("missing_ttl", "field `ttl_seconds` is required"))?;
            SessionOp::SetTimeout { id, owner, ttl }
        }
        SessionRoute::Checkpoint => SessionOp::Checkpoint {
            id: sandbox_id(path, node)?,
            owner,
        },
        SessionRoute::Restore => {
            let id = sandbox_id(path, node)?;
            let b: RestoreIn = parse_body(body)?;
            let text = b
                .checkpoint_id
                .ok_or_else(|| bad("missing_checkpoint_id", "field `checkpoint_id` is required"))?;
            SessionOp::Restore {
                id,
                owner,
                checkpoint: parse_id(SessionId::CHECKPOINT, &text, node)?,
            }
        }
        SessionRoute::DeleteCheckpoint => SessionOp::DeleteCheckpoint {
            id: parse_id(SessionId::CHECKPOINT, path_id(path), node)?,
            owner,
        },
        SessionRoute::Batch => {
            #[derive(Deserialize)]
            struct BatchIn {
                from_sandbox: String,
                executions: Option<Vec<serde_json::Value>>,
            }
            let b: BatchIn = serde_json::from_slice(body)
                .map_err(|e| bad("invalid_json", format!("invalid JSON body: {e}")))?;
            let id = parse_id(SessionId::SANDBOX, &b.from_sandbox, node)?;
            let items = b
                .executions
                .ok_or_else(|| bad("missing_executions", "field `executions` is required"))?;
            if items.is_empty() || items.len() > crate::engine::session::MAX_FORK_COUNT {
                return Err(bad(
                    "invalid_batch",
                    format!(
                        "a batch from a sandbox has 1 to {} executions, got {}",
                        crate::engine::session::MAX_FORK_COUNT,
                        items.len()
                    ),
                ));
            }
            let mut reqs = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let parsed: ExecIn = serde_json::from_value(item)
                    .map_err(|e| bad("invalid_json", format!("executions[{i}]: {e}")))?;
                reqs.push(exec_request(parsed, rules).map_err(|mut e| {
                    e.message = format!("executions[{i}]: {}", e.message);
                    e
                })?);
            }
            wire::check_batch_time(reqs.iter().map(|(r, _)| r.timeout), rules)?;
            SessionOp::Batch { id, owner, reqs }
        }
        SessionRoute::List => unreachable!("answered from the directory"),
    })
}

/// The `from_sandbox` of a batch body, if it names one.
pub fn batch_source(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        from_sandbox: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).ok()?.from_sandbox
}

/// The lane a decoded operation runs on: `None` for any worker of the
/// receiving shard (a new session), else the owner's (shard, worker).
pub fn target(op: &SessionOp) -> Option<(usize, usize)> {
    let id = match op {
        SessionOp::Create {
            from_checkpoint: None,
            ..
        } => return None,
        SessionOp::Create {
            from_checkpoint: Some(c),
            ..
        } => c,
        SessionOp::Get { id, .. }
        | SessionOp::Exec { id, .. }
        | SessionOp::Fork { id, .. }
        | SessionOp::SetTimeout { id, .. }
        | SessionOp::Delete { id, .. }
        | SessionOp::Checkpoint { id, .. }
        | SessionOp::Restore { id, .. }
        | SessionOp::DeleteCheckpoint { id, .. }
        | SessionOp::Batch { id, .. } => id,
    };
    Some((id.shard, id.worker))
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// The message a client gets for `e`: a server-side failure (5xx) answers
/// a request id, its detail going to the server log under that id.
fn public_message<'a>(e: &'a SessionError, id: &mut dyn FnMut() -> String) -> Cow<'a, str> {
    if e.status >= 500 {
        let id = id();
        Cow::Owned(wire::internal_error(
            &id,
            &format!("{}: {}", e.code, e.message),
        ))
    } else {
        Cow::Borrowed(&e.message)
    }
}

fn error_body(e: &SessionError, id: &mut dyn FnMut() -> String) -> (u16, Vec<u8>) {
    (e.status, wire::error_json(e.code, &public_message(e, id)))
}

fn json(status: u16, v: &serde_json::Value) -> (u16, Vec<u8>) {
    (
        status,
        serde_json::to_vec(v).expect("serialising a JSON value cannot fail"),
    )
}

fn info_json(info: &SessionInfo) -> serde_json::Value {
    serde_json::to_value(info).expect("serialising plain data cannot fail")
}

fn child_json(
    r: &Result<SessionInfo, SessionError>,
    id: &mut dyn FnMut() -> String,
) -> serde_json::Value {
    match r {
        Ok(info) => info_json(info),
        Err(e) => {
            serde_json::json!({"error": {"code": e.code, "message": public_message(e, id)}})
        }
    }
}

/// Serialises one exec result with the session fields added.
/// Its outputs take at most `cap` bytes escaped (see [`wire::write_exec_result`]).
pub fn exec_json(out: &mut Vec<u8>, id: &str, info: &SessionInfo, result: &ExecResult, cap: usize) {
    wire::write_exec_result(out, id, result, cap);
    // write_exec_result wrote one JSON object: extend it in place.
    let close = out.pop();
    debug_assert_eq!(close, Some(b'}'));
    let extra = serde_json::json!({
        "sandbox_id": info.sandbox_id,
        "execution_count": info.execution_count,
        "result": result.result.as_ref().map(|text| serde_json::json!({"text": text, "truncated": result.result_truncated})),
    });
    let extra = serde_json::to_vec(&extra).expect("serialising a JSON value cannot fail");
    out.push(b',');
    out.extend_from_slice(&extra[1..]);
}

/// Status and JSON body for a session reply; exec outputs take at most
/// `output_cap` bytes escaped, a batch's together.
pub fn encode(
    reply: &SessionReply,
    exec_id: &mut dyn FnMut() -> String,
    output_cap: usize,
) -> (u16, Vec<u8>) {
    match reply {
        SessionReply::Error(e) => error_body(e, exec_id),
        SessionReply::Created(list) if list.len() == 1 => match &list[0] {
            Ok(info) => json(201, &info_json(info)),
            Err(e) => error_body(e, exec_id),
        },
        SessionReply::Created(list) => json(
            201,
            &serde_json::json!({"sandboxes": list.iter().map(|r| child_json(r, exec_id)).collect::<Vec<_>>()}),
        ),
        SessionReply::Info(info) => json(200, &info_json(info)),
        SessionReply::Exec { info, result } => {
            let mut body = Vec::with_capacity(256 + result.stdout.len() * 2 + result.stderr.len());
            exec_json(&mut body, &exec_id(), info, result, output_cap);
            (200, body)
        }
        SessionReply::Forked {
            source_id,
            pause,
            forks,
        } => json(
            201,
            &serde_json::json!({
                "source_id": source_id,
                "pause_ms": ms(*pause),
                "forks": forks.iter().map(|r| child_json(r, exec_id)).collect::<Vec<_>>(),
            }),
        ),
        SessionReply::Deleted => (204, Vec::new()),
        SessionReply::Checkpointed {
            checkpoint_id,
            dirty_bytes,
            pause,
        } => json(
            201,
            &serde_json::json!({"checkpoint_id": checkpoint_id, "dirty_bytes": dirty_bytes, "pause_ms": ms(*pause)}),
        ),
        SessionReply::Restored { info, restore } => {
            let mut v = info_json(info);
            v["restore_ms"] = serde_json::json!(ms(*restore));
            json(200, &v)
        }
        SessionReply::Batch(results) => {
            let mut body = Vec::with_capacity(256 * results.len());
            wire::write_batch(&mut body, results, exec_id, output_cap);
            (200, body)
        }
    }
}

/// `GET /v1/sandboxes`.
pub fn list_json(sessions: &[SessionInfo]) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"sandboxes": sessions.iter().map(info_json).collect::<Vec<_>>()}),
    )
    .expect("serialising a JSON value cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> DecodeRules {
        DecodeRules {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_batch: 4,
            max_batch_time: Duration::from_secs(1920),
            languages: vec![Language::Python],
        }
    }

    #[test]
    fn server_errors_answer_a_request_id_not_the_host_detail() {
        let mut n = 0;
        let mut ids = || {
            n += 1;
            format!("req-{n}")
        };
        let host = SessionError::new(
            500,
            "restore_failed",
            "mmap: Cannot allocate memory /dev/kvm",
        );
        let (status, body) = encode(&SessionReply::Error(host.clone()), &mut ids, usize::MAX);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 500);
        assert_eq!(v["error"]["code"], "restore_failed");
        assert_eq!(v["error"]["message"], "internal error; request id req-1");
        let (_, body) = encode(
            &SessionReply::Created(vec![Err(host.clone()), Err(host)]),
            &mut ids,
            usize::MAX,
        );
        let text = String::from_utf8(body).unwrap();
        assert!(!text.contains("mmap") && !text.contains("/dev"), "{text}");
        assert!(
            text.contains("request id req-2") && text.contains("request id req-3"),
            "{text}"
        );
        // Client errors keep their message.
        let (status, body) = encode(
            &SessionReply::Error(SessionError::new(404, "sandbox_not_found", "no sandbox x")),
            &mut ids,
            usize::MAX,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, v["error"]["message"].as_str()),
            (404, Some("no sandbox x"))
        );
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(
            route("/v1/sandboxes", "POST"),
            Some(Ok(SessionRoute::Create))
        );
        assert_eq!(
            route("/v1/sandboxes?x=1", "GET"),
            Some(Ok(SessionRoute::List))
        );
        assert_eq!(
            route("/v1/sandboxes/abc", "DELETE"),
            Some(Ok(SessionRoute::Delete))
        );
        assert_eq!(
            route("/v1/sandboxes/abc/fork", "POST"),
            Some(Ok(SessionRoute::Fork))
        );
        assert_eq!(route("/v1/sandboxes/abc/fork", "GET"), Some(Err("POST")));
        assert_eq!(
            route("/v1/checkpoints/c", "DELETE"),
            Some(Ok(SessionRoute::DeleteCheckpoint))
        );
        assert_eq!(route("/v1/sandboxes/abc/nope", "POST"), None);
        assert_eq!(route("/v1/exec", "POST"), None);
    }

    #[test]
    fn malformed_and_foreign_ids_are_not_found() {
        let r = rules();
        let e = decode(
            SessionRoute::Get,
            "/v1/sandboxes/garbage",
            b"",
            None,
            "n0",
            &r,
        )
        .unwrap_err();
        assert_eq!((e.status, e.code), (404, "sandbox_not_found"));
        let other = SessionId::new(SessionId::SANDBOX, "n7", 0, 0, 1);
        let e = decode(
            SessionRoute::Get,
            &format!("/v1/sandboxes/{}", other.text),
            b"",
            None,
            "n0",
            &r,
        )
        .unwrap_err();
        assert_eq!((e.status, e.code), (404, "sandbox_not_found"));
        assert!(e.message.contains("n7"), "{}", e.message);
    }

    #[test]
    fn bodies_are_validated() {
        let r = rules();
        let id = SessionId::new(SessionId::SANDBOX, "n0", 0, 1, 5);
        let path = format!("/v1/sandboxes/{}/fork", id.text);
        for (body, code) in [
            (&br#"{"count":0}"#[..], "invalid_count"),
            (br#"{"count":101}"#, "invalid_count"),
            (br#"{"count":"2"}"#, "invalid_json"),
            (br#"{"cuont":2}"#, "invalid_json"),
            (br#"{"ttl_seconds":0}"#, "invalid_ttl"),
            (b"{", "invalid_json"),
        ] {
            let e = decode(SessionRoute::Fork, &path, body, None, "n0", &r).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(body));
        }
        let op = decode(SessionRoute::Fork, &path, b"", None, "n0", &r).unwrap();
        assert!(matches!(
            op,
            SessionOp::Fork {
                count: 1,
                ttl: None,
                ..
            }
        ));
        let e = decode(
            SessionRoute::Create,
            "/v1/sandboxes",
            br#"{"language":"node"}"#,
            None,
            "n0",
            &r,
        )
        .unwrap_err();
        assert_eq!(e.code, "unknown_language");
        let e = decode(
            SessionRoute::Create,
            "/v1/sandboxes",
            br#"{"metadata":[1]}"#,
            None,
            "n0",
            &r,
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_metadata");
        let exec = format!("/v1/sandboxes/{}/exec", id.text);
        let e = decode(SessionRoute::Exec, &exec, br#"{}"#, None, "n0", &r).unwrap_err();
        assert_eq!(e.code, "missing_code");
        let big = format!(
            r#"{{"code":"{}"}}"#,
            "x".repeat(crate::engine::mailbox::CODE_MAX + 1)
        );
        let e = decode(SessionRoute::Exec, &exec, big.as_bytes(), None, "n0", &r).unwrap_err();
        assert_eq!((e.status, e.code), (413, "code_too_large"));
    }

    #[test]
    fn exec_json_extends_the_exec_object() {
        let info = SessionInfo {
            sandbox_id: "sbx_x".into(),
            language: Language::Python,
            template: "t".into(),
            created_at: 0.0,
            expires_at: 1.0,
            fork_time_ms: 0.0,
            execution_count: 3,
            memory_bytes: 0,
            metadata: serde_json::Value::Null,
        };
        let result = ExecResult {
            stdout: b"2\n".to_vec(),
            result: Some("2".into()),
            ..Default::default()
        };
        let mut out = Vec::new();
        exec_json(&mut out, "id1", &info, &result, usize::MAX);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stdout"], "2\n");
        assert_eq!(v["sandbox_id"], "sbx_x");
        assert_eq!(v["execution_count"], 3);
        assert_eq!(v["result"]["text"], "2");
    }
}
