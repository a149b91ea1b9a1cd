/** Request and response types of the kvmfork API (wire names, snake_case). */
import { ProtocolError } from "./errors.js";

/** Languages the server accepts; `javascript` is an alias of `node`. */
export type Language = "python" | "node" | "javascript";

/** Why a run ended without a normal exit (`code` e.g. `"guest_crashed"`). */
export interface ErrorInfo {
  code: string;
  message: string;
}

/** Body of `POST /v1/exec`, one item of `POST /v1/exec/batch`. */
export interface ExecRequestBody {
  code: string;
  language?: Language | string;
  timeout_seconds?: number;
}

/**
 * The outcome of one run. `exit_code` follows `python -c` / `node -e`
 * semantics and is -1 when the run timed out or failed (`timed_out` or
 * `error` say why). Times are milliseconds measured by the server.
 */
export interface ExecResult {
  id: string;
  stdout: string;
  stderr: string;
  exit_code: number;
  fork_time_ms: number;
  exec_time_ms: number;
  total_time_ms: number;
  /** Same as `stdout` (the name in the Zeroboot skill card's API reference). */
  output: string;
  /** Same as `total_time_ms` (the name in the Zeroboot skill card's API reference). */
  duration_ms: number;
  timed_out: boolean;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  error: ErrorInfo | null;
}

/** One served language's template in `GET /v1/health`. */
export interface TemplateState {
  language: string;
  /** Requests for this language run now. */
  ready: boolean;
  /**
   * `"building"` (requests answer 503 `template_building`), `"ready"`, or
   * `"failed"` (requests answer 500 `template_failed`; `error` says why).
   */
  state: "ready" | "building" | "failed" | string;
  /** Why the build or load failed (state `"failed"` only). */
  error?: string;
  [field: string]: unknown;
}

/** `GET /v1/health`; fields beyond `status` depend on the server version. */
export interface Health {
  /** `"ok"`, or `"draining"` (answered with HTTP 503) while shutting down. */
  status: string;
  /** Languages whose template is ready. */
  languages: string[];
  /** Every served language's template, keyed by language. */
  templates: Record<string, TemplateState>;
  shards: unknown[];
  [field: string]: unknown;
}

/** True when the code ran to completion and exited with status 0. */
export function isOk(result: ExecResult): boolean {
  return result.exit_code === 0 && !result.timed_out && result.error === null;
}

/** Checks and completes one decoded exec result (keeps unknown fields). */
export function parseExecResult(value: unknown): ExecResult {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`expected an exec result object, got ${describe(value)}`);
  }
  const obj = value as Record<string, unknown>;
  const stdout = text(obj, "stdout", text(obj, "output", ""));
  const total = num(obj, "total_time_ms", num(obj, "duration_ms", 0));
  if (typeof obj.exit_code !== "number" || !Number.isInteger(obj.exit_code)) {
    throw new ProtocolError("malformed exec result: exit_code is not an integer");
  }
  let error: ErrorInfo | null = null;
  if (typeof obj.error === "object" && obj.error !== null) {
    const e = obj.error as Record<string, unknown>;
    error = { code: String(e.code ?? ""), message: String(e.message ?? "") };
  }
  return {
    ...obj,
    id: String(obj.id ?? ""),
    stdout,
    stderr: text(obj, "stderr", ""),
    exit_code: obj.exit_code,
    fork_time_ms: num(obj, "fork_time_ms", 0),
    exec_time_ms: num(obj, "exec_time_ms", 0),
    total_time_ms: total,
    output: stdout,
    duration_ms: total,
    timed_out: obj.timed_out === true,
    stdout_truncated: obj.stdout_truncated === true,
    stderr_truncated: obj.stderr_truncated === true,
    error,
  };
}

function text(obj: Record<string, unknown>, key: string, fallback: string): string {
  const v = obj[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "string") throw new ProtocolError(`malformed exec result: ${key} is not a string`);
  return v;
}

function num(obj: Record<string, unknown>, key: string, fallback: number): number {
  const v = obj[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number") throw new ProtocolError(`malformed exec result: ${key} is not a number`);
  return v;
}

export function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value;
}
