/**
 * kvmfork: run untrusted code in throwaway KVM sandboxes.
 *
 * ```ts
 * import { Sandbox } from "@kvmfork/sdk";
 * const out = await new Sandbox(process.env.KVMFORK_API_KEY).run("print(1 + 1)"); // "2"
 * ```
 */
export { Sandbox, checkResult, parseRetryAfter, VERSION, DEFAULT_BASE_URL, SERVER_DEFAULT_EXEC_TIMEOUT } from "./client.js";
export type { SandboxOptions, RunOptions, BatchItem } from "./client.js";
export { isOk, parseExecResult } from "./models.js";
export type { ExecResult, ExecRequestBody, ErrorInfo, Health, Language, TemplateState } from "./models.js";
export { LiveSandbox, Checkpoint, SandboxList, parseSandboxInfo, parseSessionExecResult } from "./session.js";
export type {
  SandboxInfo, SessionExecResult, CreateSandboxOptions, CreateSandboxesOptions, ForkOptions, RunCodeOptions, LiveSandboxCreateOptions,
} from "./session.js";
export { SandboxTool, formatResult, MAX_TOOL_OUTPUT_CHARS } from "./tool.js";
export type { ToolFormat, ToolOptions, Executor } from "./tool.js";
export {
  KvmforkError,
  NetworkError,
  ProtocolError,
  APIError,
  BadRequest,
  AuthError,
  RateLimitError,
  ServerBusy,
  SandboxError,
  SandboxTimeout,
  ExecError,
  QuotaExceeded,
  SandboxNotFound,
  SandboxExpired,
  SandboxEnded,
  CheckpointNotFound,
  PartialFailure,
  QUOTA_CODES,
} from "./errors.js";
export type { ErrorDetails, SandboxGoneReason, StartFailure } from "./errors.js";
