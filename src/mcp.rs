//! `kvmfork mcp`: a Model Context Protocol server (stdio) whose tools run
//! code in kvmfork sandboxes. It is a client of a running kvmfork HTTP API
//! (`POST /v1/exec`, `/v1/sandboxes…`); the protocol side is the official
//! Rust MCP SDK (`rmcp`).
//!
//! Every API failure (an HTTP error answer, or the API being unreachable)
//! becomes an MCP tool error (`isError: true`) carrying the server's status,
//! `error.code` and `message`, never a protocol error: the agent sees why.

use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Where the API is and how to authenticate, from `--url` / `--api-key` or
/// the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct McpArgs {
    /// Base URL of the kvmfork HTTP API (default: $KVMFORK_URL, else
    /// http://127.0.0.1:8080).
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer API key (default: $KVMFORK_API_KEY, else $ZEROBOOT_API_KEY;
    /// none when the server runs without auth).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve MCP over streamable HTTP at http://ADDR/mcp instead of stdio
    /// (a loopback address, e.g. 127.0.0.1:8090).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// Added to the exec timeout for the HTTP request (fork, queueing, transfer).
const HTTP_SLACK: Duration = Duration::from_secs(30);
/// HTTP timeout of calls that run no code (create, fork, delete…).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// The API's default exec timeout, used to bound the HTTP request.
const DEFAULT_EXEC_TIMEOUT_S: f64 = 30.0;

impl McpArgs {
    /// `--url`, else `KVMFORK_URL`, else the default; without a trailing `/`.
    pub fn resolved_url(&self) -> String {
        let url = self
            .url
            .clone()
            .or_else(|| non_empty_env("KVMFORK_URL"))
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        url.trim_end_matches('/').to_string()
    }

    /// `--api-key`, else `KVMFORK_API_KEY`, else `ZEROBOOT_API_KEY`.
    pub fn resolved_api_key(&self) -> Option<String> {
        self.api_key
            .clone()
            .filter(|k| !k.is_empty())
            .or_else(|| non_empty_env("KVMFORK_API_KEY"))
            .or_else(|| non_empty_env("ZEROBOOT_API_KEY"))
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Serves MCP on standard input/output until the client closes it, or with
/// `--listen` over streamable HTTP until interrupted.
pub fn run(args: &McpArgs) -> Result<(), String> {
    let url = args.resolved_url();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "--url {url:?}: expected an http:// or https:// URL"
        ));
    }
    if let Some(addr) = args.listen {
        check_listen(addr)?;
    }
    let api = ApiClient::new(url.clone(), args.resolved_api_key());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        match args.listen {
            None => serve_stdio(api, &url).await,
            Some(addr) => serve_http(api, &url, addr).await,
        }
    })
}

/// The streamable HTTP transport has no authentication of its own: it is
/// served on loopback only (the SDK also refuses non-loopback `Host` headers).
pub fn check_listen(addr: std::net::SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--listen {addr}: the MCP HTTP transport has no authentication; \
             listen on a loopback address (127.0.0.1 or ::1)"
        ))
    }
}

async fn serve_stdio(api: ApiClient, url: &str) -> Result<(), String> {
    eprintln!("kvmfork mcp: serving MCP on stdio for the kvmfork API at {url}");
    let service = KvmforkMcp::new(api)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP initialization failed: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| format!("MCP session failed: {e}"))?;
    Ok(())
}

async fn serve_http(api: ApiClient, url: &str, addr: std::net::SocketAddr) -> Result<(), String> {
    use hyper_util::rt::TokioIo;
    use rmcp::transport::streamable_http_server::{
        session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
    };
    use std::sync::Arc;

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--listen {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let service = Arc::new(StreamableHttpService::new(
        move || Ok(KvmforkMcp::new(api.clone())),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    ));
    eprintln!(
        "kvmfork mcp: serving MCP (streamable HTTP) at http://{local}/mcp for the kvmfork API at {url}"
    );
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kvmfork mcp: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let service = service.clone();
        tokio::spawn(async move {
            let handler =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let service = service.clone();
                    async move {
                        if req.uri().path() != "/mcp" {
                            return Ok::<_, std::convert::Infallible>(not_found());
                        }
                        Ok(service.handle(req).await)
                    }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                eprintln!("kvmfork mcp: HTTP connection: {e}");
            }
        });
    }
}

type HttpBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn not_found() -> hyper::Response<HttpBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(bytes::Bytes::from_static(
        b"not found: MCP is served at /mcp\n",
    ))
    .boxed();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
    resp
}

// ---------------------------------------------------------------------------
// The HTTP client of the kvmfork API.

/// A failed API call, as the tool reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The server answered with an error status.
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<String>,
    },
    /// No usable answer: connection refused, timeout, a body that is not JSON.
    Transport(String),
    /// The tool's arguments were refused before any request was made.
    InvalidArgument(String),
}

impl ApiError {
    /// Maps an error answer (`{"error": {"code", "message"}}`, or anything
    /// else a proxy may have put there) to an [`ApiError::Status`].
    pub fn from_answer(status: u16, body: &str, retry_after: Option<String>) -> ApiError {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        let err = parsed.as_ref().and_then(|v| v.get("error"));
        let field = |name: &str| {
            err.and_then(|e| e.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let code = field("code").unwrap_or_else(|| format!("http_{status}"));
        let message = field("message").unwrap_or_else(|| {
            let text = body.trim();
            if text.is_empty() {
                format!("HTTP {status} with an empty body")
            } else {
                text.chars().take(500).collect()
            }
        });
        ApiError::Status {
            status,
            code,
            message,
            retry_after,
        }
    }

    /// The MCP tool error: text for the model, the same as `structuredContent`.
    pub fn into_tool_result(self) -> CallToolResult {
        let value = match self {
            ApiError::Status {
                status,
                code,
                message,
                retry_after,
            } => {
                let mut v = json!({"status": status, "code": code, "message": message});
                if let Some(r) = retry_after {
                    v["retry_after_seconds"] = json!(r);
                }
                v
            }
            ApiError::Transport(message) => json!({"code": "api_unreachable", "message": message}),
            ApiError::InvalidArgument(message) => {
                json!({"code": "invalid_argument", "message": message})
            }
        };
        CallToolResult::structured_error(json!({ "error": value }))
    }
}

/// A blocking client of the kvmfork API (ureq), called from the runtime's
/// blocking pool.
#[derive(Clone)]
pub struct ApiClient {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
}

impl ApiClient {
    pub fn new(base: String, api_key: Option<String>) -> ApiClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .user_agent(concat!("kvmfork-mcp/", env!("CARGO_PKG_VERSION")))
            .build();
        ApiClient {
            agent: ureq::Agent::new_with_config(config),
            base,
            api_key,
        }
    }

    /// Sends one request and returns the JSON answer of a 2xx (`null` for
    /// an empty body, as `204`), or the error.
    fn call_blocking(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let url = format!("{}{}", self.base, path);
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let result = match (method, body) {
            ("DELETE", _) => {
                let mut req = self
                    .agent
                    .delete(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build();
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            (_, body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                let bytes = body.map(Value::to_string).unwrap_or_else(|| "{}".into());
                req.send(bytes.as_bytes())
            }
        };
        let mut resp = result.map_err(|e| {
            ApiError::Transport(format!("{method} {url}: cannot reach the kvmfork API: {e}"))
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| ApiError::Transport(format!("{method} {url}: reading the answer: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(ApiError::from_answer(status, &text, retry_after));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            ApiError::Transport(format!(
                "{method} {url}: the answer (HTTP {status}) is not JSON: {e}"
            ))
        })
    }

    async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let client = self.clone();
        tokio::task::spawn_blocking(move || {
            client.call_blocking(method, &path, body.as_ref(), timeout)
        })
        .await
        .map_err(|e| ApiError::Transport(format!("the HTTP request task failed: {e}")))?
    }
}

// ---------------------------------------------------------------------------
// Tool arguments.

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCodeArgs {
    /// The program. Python runs with `python -c` semantics, Node with `node -e`. At most 1 MiB.
    pub code: String,
    /// `python` (default) or `node`.
    #[serde(default)]
    pub language: Option<String>,
    /// Wall-clock limit in seconds (server default 30).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateSandboxArgs {
    /// `python` (default) or `node`.
    #[serde(default)]
    pub language: Option<String>,
    /// Seconds the sandbox lives unless deleted first (server default 300).
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunInSandboxArgs {
    /// The sandbox, as returned by create_sandbox or fork_sandbox.
    pub sandbox_id: String,
    /// The code to run; globals, imports and files in /tmp persist between calls.
    pub code: String,
    /// Wall-clock limit in seconds (server default 30); a Python run over it is
    /// interrupted and the sandbox stays usable.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ForkSandboxArgs {
    /// The sandbox to fork.
    pub sandbox_id: String,
    /// How many children (1-100), each continuing from the sandbox's exact state.
    pub count: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxIdArgs {
    /// The sandbox.
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RestoreSandboxArgs {
    /// The sandbox to roll back.
    pub sandbox_id: String,
    /// A checkpoint of it, as returned by checkpoint_sandbox.
    pub checkpoint_id: String,
}

/// Refuses an id that could change the request path (`/`, `..`, `?`…):
/// the API's ids are `[A-Za-z0-9_-]+`.
pub fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is empty")));
    }
    if id.len() > 200
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ApiError::InvalidArgument(format!(
            "{field} {id:?} is not a kvmfork id (letters, digits, `_` and `-`)"
        )));
    }
    Ok(())
}

/// Refuses a timeout that is not a positive finite number of seconds.
pub fn check_seconds(field: &str, v: Option<f64>) -> Result<(), ApiError> {
    match v {
        Some(s) if !(s.is_finite() && s > 0.0) => Err(ApiError::InvalidArgument(format!(
            "{field} must be a positive number of seconds, got {s}"
        ))),
        _ => Ok(()),
    }
}

fn exec_http_timeout(timeout_seconds: Option<f64>) -> Duration {
    let s = timeout_seconds
        .unwrap_or(DEFAULT_EXEC_TIMEOUT_S)
        .min(86_400.0);
    Duration::from_secs_f64(s) + HTTP_SLACK
}

/// The fields of an exec answer an agent needs, in a stable order; for a
/// session exec also `sandbox_id`, `execution_count` and `result`.
pub fn exec_summary(answer: &Value, session: bool) -> Value {
    let mut out = Map::new();
    let mut keys = vec![
        "stdout",
        "stderr",
        "exit_code",
        "timed_out",
        "error",
        "stdout_truncated",
        "stderr_truncated",
    ];
    if session {
        keys.extend(["result", "execution_count", "sandbox_id"]);
    }
    for k in keys {
        out.insert(k.into(), answer.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(out)
}

/// The tool result of a successful exec. Images: the API returns no image
/// results yet; when it does, each becomes a `ContentBlock::image(base64,
/// mime_type)` appended to `content` here, next to the JSON text.
fn exec_result(answer: &Value, session: bool) -> CallToolResult {
    CallToolResult::structured(exec_summary(answer, session))
}

/// `forks` of a fork answer split into the children's ids and the errors.
pub fn fork_summary(answer: &Value) -> (Value, bool) {
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for f in answer
        .get("forks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match f.get("sandbox_id").and_then(Value::as_str) {
            Some(id) => ids.push(json!(id)),
            None => errors.push(f.get("error").cloned().unwrap_or_else(|| f.clone())),
        }
    }
    let none = ids.is_empty();
    let v = json!({
        "source_id": answer.get("source_id").cloned().unwrap_or(Value::Null),
        "sandbox_ids": ids,
        "errors": errors,
        "pause_ms": answer.get("pause_ms").cloned().unwrap_or(Value::Null),
    });
    (v, none)
}

fn done(r: Result<CallToolResult, ApiError>) -> Result<CallToolResult, ErrorData> {
    Ok(r.unwrap_or_else(ApiError::into_tool_result))
}

// ---------------------------------------------------------------------------
// The MCP server.

#[derive(Clone)]
pub struct KvmforkMcp {
    api: ApiClient,
    tool_router: ToolRouter<KvmforkMcp>,
}

#[tool_router]
impl KvmforkMcp {
    pub fn new(api: ApiClient) -> KvmforkMcp {
        KvmforkMcp {
            api,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Run code once in a fresh, isolated sandbox (a copy-on-write fork of a KVM VM; \
                       Python with numpy, or Node) and return its stdout, stderr, exit_code, \
                       timed_out and error. Nothing persists between calls: use create_sandbox \
                       and run_in_sandbox for state."
    )]
    async fn run_code(
        &self,
        Parameters(a): Parameters<RunCodeArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_seconds("timeout_seconds", a.timeout_seconds)?;
                let mut body = json!({"code": a.code});
                if let Some(l) = a.language {
                    body["language"] = json!(l);
                }
                if let Some(t) = a.timeout_seconds {
                    body["timeout_seconds"] = json!(t);
                }
                let timeout = exec_http_timeout(a.timeout_seconds);
                let answer = self
                    .api
                    .call("POST", "/v1/exec".into(), Some(body), timeout)
                    .await?;
                Ok(exec_result(&answer, false))
            }
            .await,
        )
    }

    #[tool(
        description = "Start a live sandbox whose state (variables, imports, files in /tmp) \
                       persists between run_in_sandbox calls. Returns its sandbox_id and \
                       expires_at (Unix seconds); delete it with delete_sandbox when done."
    )]
    async fn create_sandbox(
        &self,
        Parameters(a): Parameters<CreateSandboxArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_seconds("ttl_seconds", a.ttl_seconds)?;
                let mut body = json!({});
                if let Some(l) = a.language {
                    body["language"] = json!(l);
                }
                if let Some(t) = a.ttl_seconds {
                    body["ttl_seconds"] = json!(t);
                }
                let answer = self
                    .api
                    .call("POST", "/v1/sandboxes".into(), Some(body), CONTROL_TIMEOUT)
                    .await?;
                Ok(CallToolResult::structured(answer))
            }
            .await,
        )
    }

    #[tool(
        description = "Run code in a live sandbox; state from earlier calls is kept. Returns \
                       stdout, stderr, exit_code, timed_out, error, result (the value of the \
                       code's final expression as {text, truncated}, or null) and \
                       execution_count. An exception does not lose the sandbox's state."
    )]
    async fn run_in_sandbox(
        &self,
        Parameters(a): Parameters<RunInSandboxArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_id("sandbox_id", &a.sandbox_id)?;
                check_seconds("timeout_seconds", a.timeout_seconds)?;
                let mut body = json!({"code": a.code});
                if let Some(t) = a.timeout_seconds {
                    body["timeout_seconds"] = json!(t);
                }
                let path = format!("/v1/sandboxes/{}/exec", a.sandbox_id);
                let timeout = exec_http_timeout(a.timeout_seconds);
                let answer = self.api.call("POST", path, Some(body), timeout).await?;
                Ok(exec_result(&answer, true))
            }
            .await,
        )
    }

    #[tool(
        description = "Fork a live sandbox: start `count` (1-100) children that each continue \
                       from its exact state (then diverge independently). Returns the \
                       children's sandbox_ids and any per-child errors (e.g. a key's sandbox \
                       limit)."
    )]
    async fn fork_sandbox(
        &self,
        Parameters(a): Parameters<ForkSandboxArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_id("sandbox_id", &a.sandbox_id)?;
                let path = format!("/v1/sandboxes/{}/fork", a.sandbox_id);
                let body = json!({"count": a.count});
                let answer = self
                    .api
                    .call("POST", path, Some(body), CONTROL_TIMEOUT)
                    .await?;
                let (summary, none_started) = fork_summary(&answer);
                Ok(if none_started {
                    CallToolResult::structured_error(summary)
                } else {
                    CallToolResult::structured(summary)
                })
            }
            .await,
        )
    }

    #[tool(description = "Stop a live sandbox and free its resources.")]
    async fn delete_sandbox(
        &self,
        Parameters(a): Parameters<SandboxIdArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_id("sandbox_id", &a.sandbox_id)?;
                let path = format!("/v1/sandboxes/{}", a.sandbox_id);
                self.api.call("DELETE", path, None, CONTROL_TIMEOUT).await?;
                Ok(CallToolResult::structured(json!({"deleted": a.sandbox_id})))
            }
            .await,
        )
    }

    #[tool(
        description = "Capture a live sandbox's whole state (memory, files) as a checkpoint; \
                       returns checkpoint_id for restore_sandbox."
    )]
    async fn checkpoint_sandbox(
        &self,
        Parameters(a): Parameters<SandboxIdArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_id("sandbox_id", &a.sandbox_id)?;
                let path = format!("/v1/sandboxes/{}/checkpoints", a.sandbox_id);
                let answer = self
                    .api
                    .call("POST", path, Some(json!({})), CONTROL_TIMEOUT)
                    .await?;
                Ok(CallToolResult::structured(answer))
            }
            .await,
        )
    }

    #[tool(
        description = "Roll a live sandbox back in place to one of its checkpoints (everything \
                       since is undone)."
    )]
    async fn restore_sandbox(
        &self,
        Parameters(a): Parameters<RestoreSandboxArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        done(
            async {
                check_id("sandbox_id", &a.sandbox_id)?;
                check_id("checkpoint_id", &a.checkpoint_id)?;
                let path = format!("/v1/sandboxes/{}/restore", a.sandbox_id);
                let body = json!({"checkpoint_id": a.checkpoint_id});
                let answer = self
                    .api
                    .call("POST", path, Some(body), CONTROL_TIMEOUT)
                    .await?;
                Ok(CallToolResult::structured(answer))
            }
            .await,
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KvmforkMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kvmfork", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Run untrusted code in hardware-isolated KVM sandboxes. run_code for one-off \
                 runs; create_sandbox + run_in_sandbox for state kept between calls; \
                 fork_sandbox to branch a sandbox's state; checkpoint_sandbox / \
                 restore_sandbox to roll back; delete_sandbox when done. API failures are \
                 tool errors with the server's error code.",
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(r: CallToolResult) -> Value {
        assert_eq!(r.is_error, Some(true));
        r.structured_content.expect("structured error")["error"].clone()
    }

    #[test]
    fn api_error_answer_keeps_code_message_and_retry_after() {
        let e = ApiError::from_answer(
            404,
            r#"{"error": {"code": "sandbox_not_found", "message": "no sandbox sbx_x"}}"#,
            None,
        );
        let v = error_of(e.into_tool_result());
        assert_eq!(v["status"], 404);
        assert_eq!(v["code"], "sandbox_not_found");
        assert_eq!(v["message"], "no sandbox sbx_x");

        let e = ApiError::from_answer(
            429,
            r#"{"error": {"code": "rate_limited", "message": "slow down"}}"#,
            Some("2".into()),
        );
        let r = e.into_tool_result();
        let text = format!("{:?}", r.content);
        assert!(text.contains("rate_limited"), "{text}");
        let v = error_of(r);
        assert_eq!(v["retry_after_seconds"], "2");
    }

    #[test]
    fn api_error_from_a_non_json_answer() {
        let e = ApiError::from_answer(502, "<html>Bad Gateway</html>", None);
        assert_eq!(
            e,
            ApiError::Status {
                status: 502,
                code: "http_502".into(),
                message: "<html>Bad Gateway</html>".into(),
                retry_after: None
            }
        );
        let e = ApiError::from_answer(401, "", None);
        let ApiError::Status { message, .. } = e else {
            panic!()
        };
        assert_eq!(message, "HTTP 401 with an empty body");
    }

    #[test]
    fn ids_that_would_change_the_path_are_refused() {
        assert!(check_id("sandbox_id", "sbx_n0_1_0_6f0c-a").is_ok());
        for bad in ["", "../exec", "a/b", "x?y=1", "a b", "é", &"a".repeat(201)] {
            let e = check_id("sandbox_id", bad).unwrap_err();
            assert!(matches!(e, ApiError::InvalidArgument(_)), "{bad:?}");
        }
        let v = error_of(
            check_id("sandbox_id", "a/b")
                .unwrap_err()
                .into_tool_result(),
        );
        assert_eq!(v["code"], "invalid_argument");
    }

    #[test]
    fn http_transport_listens_on_loopback_only() {
        assert!(check_listen("127.0.0.1:8090".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:0".parse().unwrap()).is_ok());
        let e = check_listen("0.0.0.0:8090".parse().unwrap()).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_listen("192.168.1.2:80".parse().unwrap()).is_err());
    }

    #[test]
    fn timeouts_must_be_positive_and_finite() {
        assert!(check_seconds("t", None).is_ok());
        assert!(check_seconds("t", Some(0.5)).is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_seconds("t", Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(exec_http_timeout(None), Duration::from_secs(60));
    }

    #[test]
    fn exec_and_fork_summaries() {
        let answer = json!({"id": "x", "stdout": "2\n", "stderr": "", "exit_code": 0,
            "timed_out": false, "error": null, "sandbox_id": "sbx_1", "execution_count": 2,
            "result": {"text": "2", "truncated": false}, "fork_time_ms": 0.3});
        let s = exec_summary(&answer, true);
        assert_eq!(s["result"]["text"], "2");
        assert_eq!(s["execution_count"], 2);
        assert!(s.get("fork_time_ms").is_none());
        assert!(exec_summary(&answer, false).get("result").is_none());

        let (v, none) = fork_summary(&json!({"source_id": "sbx_1", "pause_ms": 1.0, "forks": [
            {"sandbox_id": "sbx_2"}, {"error": {"code": "too_many_sandboxes", "message": "m"}}]}));
        assert!(!none);
        assert_eq!(v["sandbox_ids"], json!(["sbx_2"]));
        assert_eq!(v["errors"][0]["code"], "too_many_sandboxes");
        let (_, none) = fork_summary(&json!({"forks": []}));
        assert!(none);
    }

    #[test]
    fn every_tool_is_listed_with_an_object_schema() {
        let server = KvmforkMcp::new(ApiClient::new(DEFAULT_URL.into(), None));
        let tools = server.tool_router.list_all();
        let mut names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint_sandbox",
                "create_sandbox",
                "delete_sandbox",
                "fork_sandbox",
                "restore_sandbox",
                "run_code",
                "run_in_sandbox"
            ]
        );
        let run = tools.iter().find(|t| t.name == "run_code").unwrap();
        let schema = serde_json::to_value(&*run.input_schema).unwrap();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["required"], json!(["code"]));
        assert!(run.description.as_deref().unwrap_or("").contains("stdout"));
    }
}
