/**
 * Live sandboxes (sessions): state persists between runs, forks, checkpoints.
 *
 * ```ts
 * const client = new Sandbox(process.env.KVMFORK_API_KEY);
 * await using sb = await client.createSandbox({ ttlSeconds: 300 }); // deleted at the end of the scope
 * await sb.runCode("x = 1");
 * (await sb.runCode("x + 1")).result;                               // "2"
 * const [a, b] = await sb.fork(2);                                  // children continue from x == 1
 * ```
 *
 * A {@link LiveSandbox} belongs to the API key that created it. When it is
 * gone (deleted, TTL expired, ended by a crash) every call on it rejects with
 * {@link SandboxNotFound} ({@link SandboxExpired}, {@link SandboxEnded}).
 */
import { Sandbox, checkResult, parseJson } from "./client.js";
import type { BatchItem, SandboxOptions } from "./client.js";
import { CheckpointNotFound, PartialFailure, ProtocolError, SandboxNotFound, typedError } from "./errors.js";
import type { StartFailure } from "./errors.js";
import { describe, parseExecResult } from "./models.js";
import type { ExecRequestBody, ExecResult, Language } from "./models.js";

// `await using` support: the type of Symbol.asyncDispose for compilers
// without lib "esnext.disposable" (identical to the lib's declaration).
declare global {
  interface SymbolConstructor {
    readonly asyncDispose: unique symbol;
  }
}

const QUICK_TIMEOUT = 30;

/** The description of a live sandbox (wire names). Times are Unix seconds. */
export interface SandboxInfo {
  sandbox_id: string;
  language: string;
  template: string;
  created_at: number;
  expires_at: number;
  /** Time to get the sandbox's VM (fork or restore), milliseconds. */
  fork_time_ms: number;
  execution_count: number;
  /** Guest memory it holds apart from its template. */
  memory_bytes: number;
  metadata: Record<string, unknown> | null;
  /** Set only by {@link LiveSandbox.restore}. */
  restore_ms?: number;
  [field: string]: unknown;
}

/**
 * An {@link ExecResult} from a live sandbox, plus `result`: the text (`repr`)
 * of the code's final expression, IPython style, or null when the code does
 * not end with an expression or its value is None; `result_truncated` when
 * the server cut that text; `execution_count`: runs in this sandbox so far,
 * this one included.
 */
export interface SessionExecResult extends ExecResult {
  sandbox_id: string;
  execution_count: number;
  result: string | null;
  result_truncated: boolean;
}

export interface CreateSandboxOptions {
  /** Default: the server's (`"python"`); the checkpoint's when `fromCheckpoint` is set. */
  language?: Language | string;
  /** Seconds until the server stops it (default 300); extend with `setTimeout`. */
  ttlSeconds?: number;
  /** A JSON object (at most 16 KiB), returned as given. */
  metadata?: Record<string, unknown>;
  /** Start from a checkpoint instead of the template. */
  fromCheckpoint?: string | Checkpoint;
  signal?: AbortSignal;
}

export interface CreateSandboxesOptions extends CreateSandboxOptions {
  /** Keep the sandboxes that started when others failed (default: delete them and throw {@link PartialFailure}). */
  allowPartial?: boolean;
}

export interface ForkOptions {
  /** The children's TTL (default: the parent's policy). */
  ttlSeconds?: number;
  /** Keep the children that started when others failed (default: delete them and throw {@link PartialFailure}). */
  allowPartial?: boolean;
  signal?: AbortSignal;
}

export interface RunCodeOptions {
  /** Wall-clock limit in seconds (server default 30); a run over it is interrupted and the sandbox stays usable. */
  timeout?: number;
  /** Must be the sandbox's own when given. */
  language?: Language | string;
  /** Aborts the HTTP request only: the run and the sandbox go on. */
  signal?: AbortSignal;
}

/** Options of {@link LiveSandbox.create}: the sandbox's and, without `client`, the new client's. */
export interface LiveSandboxCreateOptions extends CreateSandboxOptions, SandboxOptions {
  client?: Sandbox;
}

/**
 * The sandboxes started by `fork(n)` or `createSandboxes(n)`, in order. With
 * `allowPartial` a sandbox that could not be started is left out and reported
 * in `errors`; `pauseMs` and `sourceId` are set for a fork.
 */
export class SandboxList extends Array<LiveSandbox> {
  errors: StartFailure[] = [];
  sourceId: string | undefined;
  pauseMs: number | undefined;

  // map/filter/slice build plain arrays, not SandboxLists.
  static override get [Symbol.species](): ArrayConstructor {
    return Array;
  }
}

function quote(id: string): string {
  if (typeof id !== "string" || id === "") throw new TypeError("an id must be a non-empty string");
  return encodeURIComponent(id);
}

function ttlBody(ttlSeconds: number | undefined): { ttl_seconds?: number } {
  return ttlSeconds === undefined ? {} : { ttl_seconds: ttlSeconds };
}

function quick(client: Sandbox): number {
  return client.timeout ?? QUICK_TIMEOUT;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function num(obj: Record<string, unknown>, key: string, fallback: number, what: string): number {
  const v = obj[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number") throw new ProtocolError(`malformed ${what}: ${key} is not a number`);
  return v;
}

/** Checks and completes one decoded sandbox description (keeps unknown fields). */
export function parseSandboxInfo(value: unknown): SandboxInfo {
  if (!isObject(value)) throw new ProtocolError(`expected a sandbox object, got ${describe(value)}`);
  const what = "sandbox description";
  if (typeof value.sandbox_id !== "string" || value.sandbox_id === "") throw new ProtocolError(`malformed ${what}: no sandbox_id`);
  const metadata = value.metadata ?? null;
  if (metadata !== null && !isObject(metadata)) throw new ProtocolError(`malformed ${what}: metadata is not an object`);
  const info: SandboxInfo = {
    ...value,
    sandbox_id: value.sandbox_id,
    language: String(value.language ?? ""),
    template: String(value.template ?? ""),
    created_at: num(value, "created_at", 0, what),
    expires_at: num(value, "expires_at", 0, what),
    fork_time_ms: num(value, "fork_time_ms", 0, what),
    execution_count: num(value, "execution_count", 0, what),
    memory_bytes: num(value, "memory_bytes", 0, what),
    metadata,
  };
  if (value.restore_ms !== undefined) info.restore_ms = num(value, "restore_ms", 0, what);
  return info;
}

/** Checks and completes one decoded session exec result. */
export function parseSessionExecResult(value: unknown): SessionExecResult {
  const base = parseExecResult(value);
  const obj = value as Record<string, unknown>;
  const res = obj.result ?? null;
  if (res !== null && !(isObject(res) && typeof res.text === "string")) {
    throw new ProtocolError('malformed session exec result: result is neither null nor {"text": ...}');
  }
  return {
    ...base,
    sandbox_id: String(obj.sandbox_id ?? ""),
    execution_count: num(obj, "execution_count", 0, "session exec result"),
    result: res === null ? null : (res.text as string),
    result_truncated: res !== null && res.truncated === true,
  };
}

/**
 * A captured state of a live sandbox, held by the server until deleted.
 * Restore it with {@link LiveSandbox.restore} or start new sandboxes from it
 * with `client.createSandbox({ fromCheckpoint })`. `await using` deletes it.
 */
export class Checkpoint {
  readonly client: Sandbox;
  readonly checkpointId: string;
  /** Memory it holds (counted against the key's checkpoint budget). */
  readonly dirtyBytes: number;
  /** How long the sandbox was paused to capture it. */
  readonly pauseMs: number;
  /** The sandbox it was taken from. */
  readonly sandboxId: string;
  private deleted = false;
  declare [Symbol.asyncDispose]: () => Promise<void>;

  constructor(client: Sandbox, checkpointId: string, dirtyBytes: number, pauseMs: number, sandboxId: string) {
    this.client = client;
    this.checkpointId = checkpointId;
    this.dirtyBytes = dirtyBytes;
    this.pauseMs = pauseMs;
    this.sandboxId = sandboxId;
  }

  get id(): string {
    return this.checkpointId;
  }

  /** `DELETE /v1/checkpoints/{id}`; rejects with {@link CheckpointNotFound} when it is already gone. */
  async delete(options: { signal?: AbortSignal } = {}): Promise<void> {
    await deleteCheckpoint(this.client, this.checkpointId, options.signal);
    this.deleted = true;
  }

  /** Deletes it if it still exists: true when this call deleted it. Idempotent. */
  async close(): Promise<boolean> {
    if (this.deleted) return false;
    try {
      await this.delete();
      return true;
    } catch (error) {
      if (!(error instanceof CheckpointNotFound)) throw error;
      this.deleted = true;
      return false;
    }
  }

  /** A new live sandbox starting from this checkpoint. */
  createSandbox(options: Omit<CreateSandboxOptions, "fromCheckpoint" | "language"> = {}): Promise<LiveSandbox> {
    return createSandbox(this.client, { ...options, fromCheckpoint: this.checkpointId });
  }
}

/**
 * A sandbox that lives between calls: globals, imports, the heap and files in
 * `/tmp` persist from one {@link runCode} to the next. Get one from
 * `client.createSandbox()` or {@link LiveSandbox.create}. `await using`
 * deletes it at the end of the scope. The getters (`expiresAt`,
 * `executionCount`, ...) are the last values the server reported;
 * {@link info} asks again.
 */
export class LiveSandbox {
  readonly client: Sandbox;
  lastInfo: SandboxInfo;
  private isClosed = false;
  declare [Symbol.asyncDispose]: () => Promise<void>;

  constructor(client: Sandbox, info: SandboxInfo) {
    this.client = client;
    this.lastInfo = info;
  }

  /**
   * Starts a live sandbox (E2B style). Without `client` a new {@link Sandbox}
   * client is made from the same options (`apiKey`, `baseUrl`, retries...).
   */
  static create(options: LiveSandboxCreateOptions = {}): Promise<LiveSandbox> {
    return createSandbox(options.client ?? new Sandbox(options), options);
  }

  /** The existing sandbox `sandboxId` (rejects with {@link SandboxNotFound}). */
  static connect(sandboxId: string, options: SandboxOptions & { client?: Sandbox; signal?: AbortSignal } = {}): Promise<LiveSandbox> {
    return getSandbox(options.client ?? new Sandbox(options), sandboxId, options.signal);
  }

  get sandboxId(): string {
    return this.lastInfo.sandbox_id;
  }

  get id(): string {
    return this.lastInfo.sandbox_id;
  }

  get language(): string {
    return this.lastInfo.language;
  }

  get template(): string {
    return this.lastInfo.template;
  }

  get metadata(): Record<string, unknown> | null {
    return this.lastInfo.metadata;
  }

  /** Unix seconds. */
  get createdAt(): number {
    return this.lastInfo.created_at;
  }

  /** Unix seconds. */
  get expiresAt(): number {
    return this.lastInfo.expires_at;
  }

  get executionCount(): number {
    return this.lastInfo.execution_count;
  }

  /** True after {@link close} or {@link delete} succeeded here. */
  get closed(): boolean {
    return this.isClosed;
  }

  /**
   * Runs `code` in this sandbox; names it defines stay for the next run.
   * Resolves to the full result and never rejects for what the code did (an
   * exception is `exit_code` 1 with the traceback on `stderr`; a run over
   * `timeout` is interrupted, `timed_out` is set and the sandbox stays
   * usable). Rejects with {@link SandboxNotFound} when the sandbox is gone.
   */
  async runCode(code: string, options: RunCodeOptions | number = {}): Promise<SessionExecResult> {
    const opts = typeof options === "number" ? { timeout: options } : options;
    if (typeof code !== "string") throw new TypeError("code must be a string");
    const body: ExecRequestBody = { code };
    if (opts.language !== undefined) body.language = opts.language;
    if (opts.timeout !== undefined) body.timeout_seconds = opts.timeout;
    const answer = await this.action("POST", "exec", body, this.client._httpTimeout([opts.timeout]), opts.signal);
    const result = parseSessionExecResult(parseJson(answer));
    this.lastInfo = { ...this.lastInfo, execution_count: result.execution_count };
    return result;
  }

  /**
   * {@link runCode} resolving to stdout without trailing newlines, rejecting
   * with `ExecError`, `SandboxTimeout` or `SandboxError` like `Sandbox.run`.
   */
  async run(code: string, options: RunCodeOptions | number = {}): Promise<string> {
    const opts = typeof options === "number" ? { timeout: options } : options;
    return checkResult(await this.runCode(code, opts), opts.timeout).stdout.replace(/\n+$/, "");
  }

  /**
   * Runs each item in its own throwaway fork of this sandbox (`POST
   * /v1/exec/batch` with `from_sandbox`); this sandbox is unchanged. Results
   * come back in order and do not reject for what the code did.
   */
  async runBatch(items: BatchItem[], options: { timeout?: number; signal?: AbortSignal } = {}): Promise<ExecResult[]> {
    const executions = items.map((item) => batchItem(item, options.timeout));
    if (executions.length === 0) return [];
    const answer = await this.client._request(
      "POST",
      "/v1/exec/batch",
      { from_sandbox: this.sandboxId, executions },
      this.client._httpTimeout(executions.map((e) => e.timeout_seconds)),
      options.signal,
      { sandboxId: this.sandboxId },
    );
    const data = parseJson(answer) as { results?: unknown };
    if (!isObject(data) || !Array.isArray(data.results) || data.results.length !== executions.length) {
      throw new ProtocolError(`batch answer has no 'results' array of ${executions.length} items`);
    }
    return data.results.map(parseExecResult);
  }

  /**
   * Live fork: `n` new sandboxes that continue from this one's exact state,
   * in order (a list with `pauseMs`, how long this sandbox was held). If some
   * could not be started (e.g. `too_many_sandboxes`) the others are deleted
   * and {@link PartialFailure} is thrown naming each failure; with
   * `allowPartial` the started ones are resolved, the failures in `errors`.
   */
  async fork(n = 1, options: ForkOptions = {}): Promise<SandboxList> {
    if (!Number.isInteger(n) || n < 1) throw new RangeError("n must be an integer >= 1");
    const answer = await this.action("POST", "fork", { count: n, ...ttlBody(options.ttlSeconds) }, undefined, options.signal);
    const data = parseJson(answer);
    if (!isObject(data)) throw new ProtocolError("fork answer is not a JSON object");
    const list = await started(this.client, data.forks, "fork", options.allowPartial ?? false);
    list.sourceId = typeof data.source_id === "string" ? data.source_id : undefined;
    list.pauseMs = typeof data.pause_ms === "number" ? data.pause_ms : undefined;
    return list;
  }

  /** Captures this sandbox's state (memory and machine state) on the server. */
  async checkpoint(options: { signal?: AbortSignal } = {}): Promise<Checkpoint> {
    const data = parseJson(await this.action("POST", "checkpoints", undefined, undefined, options.signal));
    if (!isObject(data) || typeof data.checkpoint_id !== "string" || data.checkpoint_id === "") {
      throw new ProtocolError("malformed checkpoint answer: no checkpoint_id");
    }
    const what = "checkpoint answer";
    return new Checkpoint(this.client, data.checkpoint_id, num(data, "dirty_bytes", 0, what), num(data, "pause_ms", 0, what), this.sandboxId);
  }

  /** Rolls this sandbox back to `checkpoint` in place (heap, files, everything); resolves to the new description (with `restore_ms`). */
  async restore(checkpoint: string | Checkpoint, options: { signal?: AbortSignal } = {}): Promise<SandboxInfo> {
    const checkpointId = typeof checkpoint === "string" ? checkpoint : checkpoint?.checkpointId;
    if (typeof checkpointId !== "string" || checkpointId === "") throw new TypeError("checkpoint must be a Checkpoint or a checkpoint id");
    const answer = await this.action("POST", "restore", { checkpoint_id: checkpointId }, undefined, options.signal, checkpointId);
    return this.update(answer);
  }

  /** Sets the remaining TTL to `seconds` from now; resolves to the new description. */
  async setTimeout(seconds: number, options: { signal?: AbortSignal } = {}): Promise<SandboxInfo> {
    return this.update(await this.action("POST", "timeout", { ttl_seconds: seconds }, quick(this.client), options.signal));
  }

  /** Asks the server for the current description; rejects with {@link SandboxNotFound} when the sandbox is gone. */
  async info(options: { signal?: AbortSignal } = {}): Promise<SandboxInfo> {
    const info = await getInfo(this.client, this.sandboxId, options.signal);
    this.lastInfo = info;
    return info;
  }

  /** True while the server still holds this sandbox. */
  async isRunning(): Promise<boolean> {
    try {
      await this.info();
      return true;
    } catch (error) {
      if (error instanceof SandboxNotFound) return false;
      throw error;
    }
  }

  /** Stops the sandbox (`DELETE`); rejects with {@link SandboxNotFound} when it was already gone. */
  async delete(options: { signal?: AbortSignal } = {}): Promise<void> {
    await this.client._request("DELETE", `/v1/sandboxes/${quote(this.sandboxId)}`, undefined, quick(this.client), options.signal, { sandboxId: this.sandboxId });
    this.isClosed = true;
  }

  /** Stops the sandbox if it still exists: true when this call deleted it, false when it was already gone. Idempotent. */
  async close(): Promise<boolean> {
    if (this.isClosed) return false;
    try {
      await this.delete();
      return true;
    } catch (error) {
      if (!(error instanceof SandboxNotFound)) throw error;
      this.isClosed = true;
      return false;
    }
  }

  /** Alias of {@link close}. */
  kill(): Promise<boolean> {
    return this.close();
  }

  private action(method: string, action: string, body: unknown, timeout: number | undefined, signal: AbortSignal | undefined, checkpointId?: string) {
    return this.client._request(method, `/v1/sandboxes/${quote(this.sandboxId)}/${action}`, body, timeout, signal, { sandboxId: this.sandboxId, checkpointId });
  }

  private update(answer: Parameters<typeof parseJson>[0]): SandboxInfo {
    const info = parseSandboxInfo(parseJson(answer));
    this.lastInfo = info;
    return info;
  }
}

// Defined only where the runtime has the symbol (Node >= 18.18 / 20.4).
if (typeof Symbol.asyncDispose === "symbol") {
  Object.defineProperty(LiveSandbox.prototype, Symbol.asyncDispose, {
    value: async function (this: LiveSandbox): Promise<void> {
      await this.close();
    },
    writable: true,
    configurable: true,
  });
  Object.defineProperty(Checkpoint.prototype, Symbol.asyncDispose, {
    value: async function (this: Checkpoint): Promise<void> {
      await this.close();
    },
    writable: true,
    configurable: true,
  });
}

function batchItem(item: BatchItem, timeout: number | undefined): ExecRequestBody {
  // The language only when the item names one: the sandbox's own applies otherwise.
  const body: ExecRequestBody = { code: "" };
  let itemTimeout = timeout;
  if (typeof item === "string") {
    body.code = item;
  } else if (isObject(item) && typeof item.code === "string") {
    body.code = item.code;
    if (item.language !== undefined) body.language = item.language;
    itemTimeout = item.timeout ?? item.timeout_seconds ?? timeout;
  } else {
    throw new TypeError("a batch item must be a string or an object with a 'code' string");
  }
  if (itemTimeout !== undefined) body.timeout_seconds = itemTimeout;
  return body;
}

async function started(client: Sandbox, entries: unknown, what: string, allowPartial: boolean): Promise<SandboxList> {
  if (!Array.isArray(entries)) throw new ProtocolError(`${what} answer has no list of sandboxes`);
  const list = new SandboxList();
  const errors: StartFailure[] = [];
  entries.forEach((entry, index) => {
    if (isObject(entry) && !("sandbox_id" in entry) && isObject(entry.error)) {
      const code = typeof entry.error.code === "string" ? entry.error.code : undefined;
      const message = typeof entry.error.message === "string" && entry.error.message ? entry.error.message : "no details";
      errors.push({ index, error: typedError(undefined, code, `${what}[${index}]${code ? ` ${code}` : ""}: ${message}`) });
    } else {
      list.push(new LiveSandbox(client, parseSandboxInfo(entry)));
    }
  });
  if (errors.length > 0 && !allowPartial) {
    await Promise.all(list.map((sb) => sb.close().catch(() => false)));
    throw new PartialFailure(
      `${errors.length} of ${entries.length} ${what} sandboxes failed to start (the ${list.length} started were deleted); first: ${errors[0]!.error.message}`,
      errors,
    );
  }
  list.errors = errors;
  return list;
}

function createBody(options: CreateSandboxOptions): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (options.language !== undefined) body.language = options.language;
  Object.assign(body, ttlBody(options.ttlSeconds));
  if (options.metadata !== undefined) {
    if (!isObject(options.metadata)) throw new TypeError("metadata must be a plain object");
    body.metadata = options.metadata;
  }
  if (options.fromCheckpoint !== undefined) {
    body.from_checkpoint = typeof options.fromCheckpoint === "string" ? options.fromCheckpoint : options.fromCheckpoint.checkpointId;
  }
  return body;
}

/** @internal */
export async function createSandbox(client: Sandbox, options: CreateSandboxOptions): Promise<LiveSandbox> {
  const body = createBody(options);
  const answer = await client._request("POST", "/v1/sandboxes", body, undefined, options.signal, { checkpointId: body.from_checkpoint as string | undefined });
  return new LiveSandbox(client, parseSandboxInfo(parseJson(answer)));
}

/** @internal */
export async function createSandboxes(client: Sandbox, count: number, options: CreateSandboxesOptions): Promise<SandboxList> {
  if (!Number.isInteger(count) || count < 1) throw new RangeError("count must be an integer >= 1");
  if (count === 1) {
    const list = new SandboxList();
    list.push(await createSandbox(client, options));
    return list;
  }
  const body: Record<string, unknown> = { ...createBody(options), count };
  const answer = await client._request("POST", "/v1/sandboxes", body, undefined, options.signal, { checkpointId: body.from_checkpoint as string | undefined });
  const data = parseJson(answer);
  return started(client, isObject(data) ? data.sandboxes : undefined, "create", options.allowPartial ?? false);
}

async function getInfo(client: Sandbox, sandboxId: string, signal?: AbortSignal): Promise<SandboxInfo> {
  const answer = await client._request("GET", `/v1/sandboxes/${quote(sandboxId)}`, undefined, quick(client), signal, { sandboxId });
  return parseSandboxInfo(parseJson(answer));
}

/** @internal */
export async function getSandbox(client: Sandbox, sandboxId: string, signal?: AbortSignal): Promise<LiveSandbox> {
  return new LiveSandbox(client, await getInfo(client, sandboxId, signal));
}

/** @internal */
export async function listSandboxes(client: Sandbox, signal?: AbortSignal): Promise<LiveSandbox[]> {
  const data = parseJson(await client._request("GET", "/v1/sandboxes", undefined, quick(client), signal));
  if (!isObject(data) || !Array.isArray(data.sandboxes)) throw new ProtocolError("list answer has no 'sandboxes' array");
  return data.sandboxes.map((entry) => new LiveSandbox(client, parseSandboxInfo(entry)));
}

/** @internal */
export async function deleteCheckpoint(client: Sandbox, checkpoint: string | Checkpoint, signal?: AbortSignal): Promise<void> {
  const checkpointId = typeof checkpoint === "string" ? checkpoint : checkpoint.checkpointId;
  await client._request("DELETE", `/v1/checkpoints/${quote(checkpointId)}`, undefined, quick(client), signal, { checkpointId });
}
