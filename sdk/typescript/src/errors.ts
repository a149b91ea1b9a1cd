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
