/** The kvmfork client: fetch-based, no runtime dependencies (Node >= 18). */
import {
  ExecError,
  KvmforkError,
  NetworkError,
  ProtocolError,
  QuotaExceeded,
  RateLimitError,
  SandboxError,
  SandboxTimeout,
  ServerBusy,
  typedError,
} from "./errors.js";
import type { ErrorContext } from "./errors.js";
import { describe, parseExecResult } from "./models.js";
import type { ExecRequestBody, ExecResult, Health, Language } from "./models.js";
import { SandboxTool } from "./tool.js";
import { createSandbox, createSandboxes, deleteCheckpoint, getSandbox, listSandboxes } from "./session.js";
import type { Checkpoint, CreateSandboxOptions, CreateSandboxesOptions, LiveSandbox, SandboxList } from "./session.js";
import type { ToolFormat, ToolOptions } from "./tool.js";

export const VERSION = "0.1.0";
export const DEFAULT_BASE_URL = "http://127.0.0.1:8080";
/** The server's own default for `timeout_seconds`. */
export const SERVER_DEFAULT_EXEC_TIMEOUT = 30;
// Added to the sandbox time limit to get the HTTP timeout: queueing and
// forking happen before the guest's clock starts.
const HTTP_TIMEOUT_MARGIN = 30;
const HEALTH_TIMEOUT = 10;
// HTTP timeout of session operations that start or copy VMs (create, fork,
// checkpoint, restore); the quick ones pass their own.
const SESSION_OP_TIMEOUT = 120;
// Errors from Node's fetch (undici) meaning the request never left this host.
const NOT_SENT_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH"]);

export interface SandboxOptions {
  /** Bearer key; default `KVMFORK_API_KEY`, else `ZEROBOOT_API_KEY`, else none. */
  apiKey?: string;
  /** Default `KVMFORK_URL`, else `http://127.0.0.1:8080`. */
  baseUrl?: string;
  /**
   * Language of `run`, `exec` and `runBatch` when the call names none
   * (default `"python"`). Live sandboxes (`createSandbox`) take their own.
   */
  language?: Language | string;
  /** HTTP timeout in seconds; default: the run's time limit plus 30 s. */
  timeout?: number;
  /** Retries of 429/503 answers and refused connections (default 3; 0 = off). */
  maxRetries?: number;
  /** First backoff in seconds when the server sends no Retry-After (default 0.5). */
  backoff?: number;
  /** Longest wait in seconds; a longer Retry-After is thrown at once (default 30). */
  maxBackoff?: number;
  /** fetch implementation (default: the global one). */
  fetch?: typeof fetch;
  /** How to wait between retries (default: a timer); tests replace it. */
  sleep?: (seconds: number) => Promise<void>;
}

export interface RunOptions {
  /** Default: the client's `language` option, else `"python"`. */
  language?: Language | string;
  /** The sandbox's wall-clock limit in seconds (server default 30). */
  timeout?: number;
  /** Aborts the HTTP request (the server stops the run when the client goes away). */
  signal?: AbortSignal;
}

/** An item of {@link Sandbox.runBatch}: code, or code with its own options. */
export type BatchItem = string | { code: string; language?: Language | string; timeout?: number; timeout_seconds?: number };

/** @internal An HTTP answer as read by the client. */
export interface Answer {
  status: number;
  headers: Headers;
  body: string;
}

/** Runs code in throwaway kvmfork sandboxes. One instance can serve many concurrent calls. */
export class Sandbox {
  readonly baseUrl: string;
  readonly apiKey: string | undefined;
  /** The language of runs that name none. */
  readonly language: string;
  readonly timeout: number | undefined;
  readonly maxRetries: number;
  readonly backoff: number;
  readonly maxBackoff: number;
  private readonly fetchImpl: typeof fetch;
  private readonly sleep: (seconds: number) => Promise<void>;
  private readonly headers: Record<string, string>;

  /**
   * `new Sandbox()`, `new Sandbox(key)`, `new Sandbox(key, baseUrl)`,
   * `new Sandbox(key, options)` or `new Sandbox(options)`.
   */
  constructor(apiKeyOrOptions?: string | SandboxOptions, baseUrlOrOptions?: string | SandboxOptions) {
    let options: SandboxOptions = {};
    if (typeof apiKeyOrOptions === "object" && apiKeyOrOptions !== null) options = { ...apiKeyOrOptions };
    if (typeof baseUrlOrOptions === "object" && baseUrlOrOptions !== null) options = { ...options, ...baseUrlOrOptions };
    if (typeof apiKeyOrOptions === "string") options.apiKey = apiKeyOrOptions;
    if (typeof baseUrlOrOptions === "string") options.baseUrl = baseUrlOrOptions;

    this.apiKey = options.apiKey || env("KVMFORK_API_KEY") || env("ZEROBOOT_API_KEY") || legacyEnv("API_KEY") || undefined;
    this.baseUrl = (options.baseUrl || env("KVMFORK_URL") || legacyEnv("URL") || DEFAULT_BASE_URL).replace(/\/+$/, "");
    if (!/^https?:\/\/[^/]/.test(this.baseUrl)) {
      throw new KvmforkError(`baseUrl must be an http:// or https:// URL, got ${JSON.stringify(this.baseUrl)}`);
    }
    this.language = options.language ?? "python";
    if (typeof this.language !== "string" || this.language === "") {
      throw new TypeError("language must be a non-empty string");
    }
    this.timeout = options.timeout;
    this.maxRetries = options.maxRetries ?? 3;
    this.backoff = options.backoff ?? 0.5;
    this.maxBackoff = options.maxBackoff ?? 30;
    if (!(this.maxRetries >= 0) || !(this.backoff >= 0) || !(this.maxBackoff >= 0)) {
      throw new RangeError("maxRetries, backoff and maxBackoff must be >= 0");
    }
    const globalFetch = (globalThis as { fetch?: typeof fetch }).fetch;
    const fetchImpl = options.fetch ?? globalFetch;
    if (!fetchImpl) throw new KvmforkError("no fetch available: use Node >= 18 or pass options.fetch");
    this.fetchImpl = fetchImpl;
    this.sleep = options.sleep ?? ((seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000)));
    this.headers = { Accept: "application/json", "User-Agent": `kvmfork-typescript/${VERSION}` };
    if (this.apiKey) this.headers.Authorization = `Bearer ${this.apiKey}`;
  }

  /**
   * Runs `code` and resolves to its stdout without trailing newlines.
   * Rejects with {@link ExecError} (with `stderr`, `exitCode`) on a non-zero
   * exit, {@link SandboxTimeout} when the time limit fired and
   * {@link SandboxError} when the sandbox itself failed.
   * `options` may be just the language name.
   */
  async run(code: string, options?: RunOptions | Language | string): Promise<string> {
    const opts = runOptions(options);
    const result = await this.exec(code, opts);
    return checkResult(result, opts.timeout).stdout.replace(/\n+$/, "");
  }

  /** Runs `code` and resolves to the full {@link ExecResult}; never rejects for what the code did. */
  async exec(code: string, options?: RunOptions | Language | string): Promise<ExecResult> {
    const opts = runOptions(options);
    const body = requestBody(code, opts.language ?? this.language, opts.timeout);
    const answer = await this.call("POST", "/v1/exec", body, this.httpTimeout([opts.timeout]), opts.signal);
    return parseExecResult(parseJson(answer));
  }

  /**
   * Runs several snippets, each in its own sandbox; results come back in
   * order. Failed items do not reject: check each result (or `checkResult`).
   */
  async runBatch(items: BatchItem[], options?: RunOptions | Language | string): Promise<ExecResult[]> {
    const opts = runOptions(options);
    const executions = items.map((item) => batchItemBody(item, { ...opts, language: opts.language ?? this.language }));
    const answer = await this.call(
      "POST",
      "/v1/exec/batch",
      { executions },
      this.httpTimeout(executions.map((e) => e.timeout_seconds)),
      opts.signal,
    );
    const data = parseJson(answer) as { results?: unknown };
    if (!data || !Array.isArray(data.results) || data.results.length !== executions.length) {
      throw new ProtocolError(`batch answer has no 'results' array of ${executions.length} items`);
    }
    return data.results.map(parseExecResult);
  }

  /**
   * `GET /v1/health`. Not retried: a draining server answers 503 with
   * `"status": "draining"`, which is returned like any other state.
   */
  async health(options: { signal?: AbortSignal } = {}): Promise<Health> {
    const answer = await this.send("GET", "/v1/health", undefined, this.timeout ?? HEALTH_TIMEOUT, options.signal);
    if (answer.status !== 200 && !(answer.status === 503 && isHealthBody(answer.body))) throw errorFromAnswer(answer);
    const data = parseJson(answer);
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new ProtocolError(`health answer is ${describe(data)}, not an object`);
    }
    return data as Health;
  }

  /** `GET /v1/metrics`: Prometheus text exposition. */
  async metrics(options: { signal?: AbortSignal } = {}): Promise<string> {
    return (await this.call("GET", "/v1/metrics", undefined, this.timeout ?? HEALTH_TIMEOUT, options.signal)).body;
  }

  /**
   * Starts a live sandbox whose state persists between runs (`POST /v1/sandboxes`).
   * `language` defaults to the server's (python), `ttlSeconds` to 300;
   * `fromCheckpoint` starts it from a {@link Checkpoint} (or its id).
   * `await using sb = await client.createSandbox()` deletes it at the end of the scope.
   */
  createSandbox(options: CreateSandboxOptions = {}): Promise<LiveSandbox> {
    return createSandbox(this, options);
  }

  /**
   * Starts `count` live sandboxes in one request. When some cannot be
   * started the others are deleted and {@link PartialFailure} is thrown
   * (`allowPartial: true`: resolved, the failures in `.errors`).
   */
  createSandboxes(count: number, options: CreateSandboxesOptions = {}): Promise<SandboxList> {
    return createSandboxes(this, count, options);
  }

  /** The live sandbox `sandboxId` of this key; rejects with {@link SandboxNotFound} (`SandboxExpired`, `SandboxEnded`). */
  getSandbox(sandboxId: string, options: { signal?: AbortSignal } = {}): Promise<LiveSandbox> {
    return getSandbox(this, sandboxId, options.signal);
  }

  /** This key's live sandboxes, oldest first (`GET /v1/sandboxes`). */
  listSandboxes(options: { signal?: AbortSignal } = {}): Promise<LiveSandbox[]> {
    return listSandboxes(this, options.signal);
  }

  /** Drops a checkpoint; rejects with {@link CheckpointNotFound} when it is gone. */
  deleteCheckpoint(checkpoint: string | Checkpoint, options: { signal?: AbortSignal } = {}): Promise<void> {
    return deleteCheckpoint(this, checkpoint, options.signal);
  }

  /**
   * @internal Sends one API request with this client's retry policy (used by
   * the live sandbox classes). `context` names the sandbox or checkpoint for
   * the 404 errors.
   */
  _request(method: string, path: string, payload: unknown, timeout: number | undefined, signal?: AbortSignal, context: ErrorContext = {}): Promise<Answer> {
    return this.call(method, path, payload, timeout ?? this.timeout ?? SESSION_OP_TIMEOUT, signal, context);
  }

  /** @internal The HTTP timeout for runs with these time limits. */
  _httpTimeout(execTimeouts: Array<number | undefined>): number {
    return this.httpTimeout(execTimeouts);
  }

  /** A `run_code(code, language)` tool for an LLM, backed by this sandbox. */
  asTool(options: ToolOptions = {}): SandboxTool {
    return new SandboxTool(this, options);
  }

  /** The JSON-schema function description of {@link asTool}. */
  toolSpec(format: ToolFormat = "openai", options: ToolOptions = {}): Record<string, unknown> {
    return this.asTool(options).spec(format);
  }

  private httpTimeout(execTimeouts: Array<number | undefined>): number {
    if (this.timeout !== undefined) return this.timeout;
    // A batch may run its items one after another on a busy server.
    const limit = execTimeouts.reduce<number>((sum, t) => sum + (t !== undefined && t > 0 ? t : SERVER_DEFAULT_EXEC_TIMEOUT), 0);
    return limit + HTTP_TIMEOUT_MARGIN;
  }

  private async call(method: string, path: string, payload: unknown, timeout: number, signal?: AbortSignal, context: ErrorContext = {}): Promise<Answer> {
    const body = payload === undefined ? undefined : JSON.stringify(payload);
    for (let attempt = 0; ; attempt++) {
      let delay: number;
      try {
        const answer = await this.send(method, path, body, timeout, signal);
        if (answer.status >= 200 && answer.status < 300) return answer;
        const error = errorFromAnswer(answer, context);
        if (!(error instanceof RateLimitError || error instanceof ServerBusy) || attempt >= this.maxRetries) throw error;
        // A quota (too many live sandboxes, checkpoint budget) is not freed
        // by waiting: only retry when the server says when.
        if (error instanceof QuotaExceeded && error.retryAfter === undefined) throw error;
        if (error.retryAfter !== undefined) {
          if (error.retryAfter > this.maxBackoff) throw error;
          delay = error.retryAfter;
        } else {
          delay = this.backoffDelay(attempt);
        }
      } catch (error) {
        if (!(error instanceof NetworkError)) throw error;
        if (error.sent || attempt >= this.maxRetries) throw error;
        delay = this.backoffDelay(attempt);
      }
      if (signal?.aborted) throw signal.reason;
      await this.sleep(delay);
    }
  }

  private backoffDelay(attempt: number): number {
    const ceiling = Math.min(this.maxBackoff, this.backoff * 2 ** attempt);
    // Half fixed, half random: keeps growth but spreads clients refused together.
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  private async send(method: string, path: string, body: string | undefined, timeout: number, signal?: AbortSignal): Promise<Answer> {
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, timeout * 1000);
    const onAbort = () => controller.abort(signal?.reason);
    if (signal?.aborted) onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    const headers = body === undefined ? this.headers : { ...this.headers, "Content-Type": "application/json" };
    const url = this.baseUrl + path;
    try {
      const response = await this.fetchImpl(url, { method, headers, body, signal: controller.signal });
      return { status: response.status, headers: response.headers, body: await response.text() };
    } catch (error) {
      if (timedOut) throw new NetworkError(`no response from ${url} within ${timeout}s`, true, error);
      if (signal?.aborted) throw signal.reason ?? error;
      const code = causeCode(error);
      const sent = code === undefined || !NOT_SENT_CODES.has(code);
      throw new NetworkError(`request to ${url} failed: ${code ?? String(error)}`, sent, error);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
  }
}

/** Returns `result` when the code exited 0, else throws the matching error. */
export function checkResult(result: ExecResult, timeout?: number): ExecResult {
  if (result.timed_out) {
    throw new SandboxTimeout(`code did not finish within its ${timeout ?? SERVER_DEFAULT_EXEC_TIMEOUT}s time limit`, result);
  }
  if (result.error !== null) {
    throw new SandboxError(`sandbox failed (${result.error.code}): ${result.error.message}`, result);
  }
  if (result.exit_code !== 0) {
    throw new ExecError(`code exited with status ${result.exit_code}${lastLine(result.stderr)}`, result);
  }
  return result;
}

/** Maps an HTTP error answer to its typed error. */
function errorFromAnswer(answer: Answer, context: ErrorContext = {}): KvmforkError {
  let code: string | undefined;
  let message: string | undefined;
  try {
    const data = JSON.parse(answer.body) as { error?: unknown };
    if (typeof data?.error === "object" && data.error !== null) {
      const e = data.error as { code?: unknown; message?: unknown };
      if (typeof e.code === "string") code = e.code;
      if (typeof e.message === "string") message = e.message;
    } else if (typeof data?.error === "string") {
      message = data.error;
    }
  } catch {
    // Not JSON (e.g. a proxy's error page): report the text itself.
  }
  message ??= answer.body.trim().slice(0, 500) || "no details";
  const text = `HTTP ${answer.status}${code ? ` ${code}` : ""}: ${message}`;
  return typedError(answer.status, code, text, { ...context, retryAfter: parseRetryAfter(answer.headers.get("Retry-After")) });
}

/** Seconds from a `Retry-After` header (delta-seconds or HTTP date). */
export function parseRetryAfter(value: string | null | undefined): number | undefined {
  if (value === null || value === undefined) return undefined;
  const trimmed = value.trim();
  if (/^-?\d+(\.\d+)?$/.test(trimmed)) return Math.max(0, Number(trimmed));
  const when = Date.parse(trimmed);
  if (Number.isNaN(when)) return undefined;
  return Math.max(0, (when - Date.now()) / 1000);
}

function runOptions(options: RunOptions | Language | string | undefined): RunOptions {
  if (typeof options === "string") return { language: options };
  return options ?? {};
}

function requestBody(code: string, language: string | undefined, timeout: number | undefined): ExecRequestBody {
  if (typeof code !== "string") throw new TypeError("code must be a string");
  const body: ExecRequestBody = { code, language: language ?? "python" };
  if (timeout !== undefined) body.timeout_seconds = timeout;
  return body;
}

function batchItemBody(item: BatchItem, defaults: RunOptions): ExecRequestBody {
  if (typeof item === "string") return requestBody(item, defaults.language, defaults.timeout);
  if (typeof item !== "object" || item === null || typeof item.code !== "string") {
    throw new TypeError("a batch item must be a string or an object with a 'code' string");
  }
  return requestBody(item.code, item.language ?? defaults.language, item.timeout ?? item.timeout_seconds ?? defaults.timeout);
}

/** @internal */
export function parseJson(answer: Answer): unknown {
  try {
    return JSON.parse(answer.body);
  } catch (error) {
    throw new ProtocolError(`HTTP ${answer.status} answer is not JSON: ${JSON.stringify(answer.body.slice(0, 200))}`, { cause: error });
  }
}

function isHealthBody(body: string): boolean {
  try {
    const data = JSON.parse(body) as { status?: unknown } | null;
    return typeof data?.status === "string";
  } catch {
    return false;
  }
}

function causeCode(error: unknown): string | undefined {
  // undici wraps socket errors: TypeError("fetch failed", { cause: { code } }).
  for (let e: unknown = error, depth = 0; e && depth < 4; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

function lastLine(stderr: string): string {
  const lines = stderr.split("\n").filter((line) => line.trim() !== "");
  return lines.length ? `: ${lines[lines.length - 1]!.trim()}` : "";
}

function env(name: string): string | undefined {
  const processLike = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return processLike?.env?.[name] || undefined;
}

const warnedLegacy = new Set<string>();

/** The pre-rename `FORKD_<name>`, still read for one release with a warning. */
function legacyEnv(name: string): string | undefined {
  const value = env(`FORKD_${name}`);
  if (value && !warnedLegacy.has(name)) {
    warnedLegacy.add(name);
    console.warn(`kvmfork: FORKD_${name} is deprecated and will stop working in the next release; set KVMFORK_${name} instead`);
  }
  return value;
}
