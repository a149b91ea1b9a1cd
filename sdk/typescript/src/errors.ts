/**
 * Typed errors thrown by the kvmfork client. Everything thrown on purpose is a
 * {@link KvmforkError}; HTTP failures carry `status` and the server's `code`,
 * sandbox failures carry the {@link ExecResult} that caused them.
 */
import type { ExecResult } from "./models.js";

export interface ErrorDetails {
  status?: number;
  code?: string;
  cause?: unknown;
}

export class KvmforkError extends Error {
  readonly status: number | undefined;
  readonly code: string | undefined;

  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.status = details.status;
    this.code = details.code;
  }
}

/**
 * The server could not be reached, or the connection broke or timed out.
 * `sent` is false when the request certainly never reached the server
 * (connection refused, DNS failure), which makes it safe to retry.
 */
export class NetworkError extends KvmforkError {
  readonly sent: boolean;

  constructor(message: string, sent: boolean, cause?: unknown) {
    super(message, { cause });
    this.sent = sent;
  }
}

/** The server answered something that is not the kvmfork API. */
export class ProtocolError extends KvmforkError {}

/** An HTTP error status without a more specific class (404, 405, 5xx...). */
export class APIError extends KvmforkError {}

/** 400 or 413: the request was refused as invalid; retrying will not help. */
export class BadRequest extends APIError {}

/** 401: the API key is missing or not accepted. */
export class AuthError extends APIError {}

/** 429: this key exceeded its rate limit; `retryAfter` is in seconds. */
export class RateLimitError extends APIError {
  readonly retryAfter: number | undefined;

  constructor(message: string, details: ErrorDetails & { retryAfter?: number }) {
    super(message, details);
    this.retryAfter = details.retryAfter;
  }
}

/** 503: the server is overloaded or draining; `retryAfter` is in seconds. */
export class ServerBusy extends APIError {
  readonly retryAfter: number | undefined;

  constructor(message: string, details: ErrorDetails & { retryAfter?: number }) {
    super(message, details);
    this.retryAfter = details.retryAfter;
  }
}

/**
 * The sandbox did not finish normally (guest crash, memory limit...).
 * Thrown by `run()`; `exec()` returns the result instead.
 */
export class SandboxError extends KvmforkError {
  readonly result: ExecResult;

  constructor(message: string, result: ExecResult) {
    super(message, { code: result.error?.code });
    this.result = result;
  }
}

/** The code ran longer than its timeout and the sandbox was stopped. */
export class SandboxTimeout extends SandboxError {}

/** The code exited with a non-zero status; `stderr` holds e.g. the traceback. */
export class ExecError extends SandboxError {
  readonly stdout: string;
  readonly stderr: string;
  readonly exitCode: number;

  constructor(message: string, result: ExecResult) {
    super(message, result);
    this.stdout = result.stdout;
    this.stderr = result.stderr;
    this.exitCode = result.exit_code;
  }
}

/**
 * 429 for a limit that waiting does not clear: `too_many_sandboxes` (this key
 * holds its maximum of live sandboxes), `server_sandbox_limit` (the server is
 * full) or `checkpoint_budget_exceeded` (this key's checkpoints would exceed
 * its memory budget). Not retried unless the server sends `Retry-After`:
 * delete sandboxes or checkpoints first. Still a {@link RateLimitError}.
 */
export class QuotaExceeded extends RateLimitError {}

/** Why a {@link SandboxNotFound} sandbox is gone. */
export type SandboxGoneReason = "not_found" | "expired" | "ended";

/**
 * 404: the live sandbox is gone, or never existed for this API key.
 * `sandboxId` names it (when the SDK knows it) and `reason` says why:
 * `"not_found"` (unknown, deleted, or another key's), `"expired"`
 * ({@link SandboxExpired}: its TTL ran out) or `"ended"` ({@link SandboxEnded}:
 * a run crashed it or could not be interrupted). Everything it held is lost.
 */
export class SandboxNotFound extends APIError {
  readonly sandboxId: string | undefined;

  constructor(message: string, details: ErrorDetails & { sandboxId?: string }) {
    super(message, details);
    this.sandboxId = details.sandboxId;
  }

  get reason(): SandboxGoneReason {
    return "not_found";
  }
}

/** 404 `sandbox_expired`: the sandbox reached its `expires_at` and was stopped. */
export class SandboxExpired extends SandboxNotFound {
  override get reason(): SandboxGoneReason {
    return "expired";
  }
}

/** 404 `sandbox_ended`: a run crashed the sandbox, hit its memory limit or could not be interrupted. */
export class SandboxEnded extends SandboxNotFound {
  override get reason(): SandboxGoneReason {
    return "ended";
  }
}

/** 404 `checkpoint_not_found`: unknown, deleted, or another key's checkpoint. */
export class CheckpointNotFound extends APIError {
  readonly checkpointId: string | undefined;

  constructor(message: string, details: ErrorDetails & { checkpointId?: string }) {
    super(message, details);
    this.checkpointId = details.checkpointId;
  }
}

/** One sandbox of a `fork(n)` / `createSandboxes(n)` that could not be started. */
export interface StartFailure {
  index: number;
  error: KvmforkError;
}

/**
 * Some of the sandboxes asked for by `fork(n)` or `createSandboxes(n)` could
 * not be started. `errors` lists each failure, typed as if it had been the
 * answer to a single request (e.g. {@link QuotaExceeded}). The sandboxes that
 * did start were deleted first (pass `allowPartial: true` to keep them);
 * `status` and `code` are the first failure's.
 */
export class PartialFailure extends KvmforkError {
  readonly errors: StartFailure[];

  constructor(message: string, errors: StartFailure[]) {
    super(message, { status: errors[0]?.error.status, code: errors[0]?.error.code });
    this.errors = errors;
  }
}

/** 429 codes for quotas that waiting does not clear (see {@link QuotaExceeded}). */
export const QUOTA_CODES: ReadonlySet<string> = new Set(["too_many_sandboxes", "server_sandbox_limit", "checkpoint_budget_exceeded"]);

// The status of each session error code, for the per-item errors inside a 201
// answer (fork or create of several sandboxes), which carry none.
const SESSION_CODE_STATUS: Record<string, number> = {
  too_many_sandboxes: 429, server_sandbox_limit: 429, checkpoint_budget_exceeded: 429,
  sandbox_not_found: 404, sandbox_expired: 404, sandbox_ended: 404, checkpoint_not_found: 404,
  sandbox_busy: 503, queue_full: 503, invalid_ttl: 400, invalid_count: 400, language_mismatch: 400,
  checkpoint_mismatch: 400, no_template: 400, fork_failed: 500, checkpoint_failed: 500, internal: 500,
};

export interface ErrorContext {
  retryAfter?: number;
  sandboxId?: string;
  checkpointId?: string;
}

/** The error for a server error `code` (and HTTP `status`, inferred from the code when undefined). */
export function typedError(status: number | undefined, code: string | undefined, text: string, context: ErrorContext = {}): KvmforkError {
  if (status === undefined && code !== undefined) status = SESSION_CODE_STATUS[code];
  const details = { status, code };
  switch (status) {
    case 400:
    case 411:
    case 413:
    case 417:
    case 422:
    case 431:
      return new BadRequest(text, details);
    case 401:
    case 403:
      return new AuthError(text, details);
    case 404:
      if (code === "sandbox_expired") return new SandboxExpired(text, { ...details, sandboxId: context.sandboxId });
      if (code === "sandbox_ended") return new SandboxEnded(text, { ...details, sandboxId: context.sandboxId });
      if (code === "sandbox_not_found") return new SandboxNotFound(text, { ...details, sandboxId: context.sandboxId });
      if (code === "checkpoint_not_found") return new CheckpointNotFound(text, { ...details, checkpointId: context.checkpointId });
      return new APIError(text, details);
    case 429:
      if (code !== undefined && QUOTA_CODES.has(code)) return new QuotaExceeded(text, { ...details, retryAfter: context.retryAfter });
      return new RateLimitError(text, { ...details, retryAfter: context.retryAfter });
    case 503:
      return new ServerBusy(text, { ...details, retryAfter: context.retryAfter });
    default:
      return new APIError(text, details);
  }
}
