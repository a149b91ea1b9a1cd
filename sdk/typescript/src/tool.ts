/**
 * Exposing a sandbox to an LLM as a function-calling tool. `spec()` gives
 * the JSON-schema description; `call()` runs the model's code and returns
 * text for the model: stdout on success, otherwise the exit status, stderr
 * and stdout, so the model can read its own traceback and fix the code.
 */
import { BadRequest } from "./errors.js";
import { isOk } from "./models.js";
import type { ExecResult } from "./models.js";

/** Spec shapes: OpenAI `tools` entry, Anthropic `input_schema`, or plain. */
export type ToolFormat = "openai" | "anthropic" | "json_schema";

export interface ToolOptions {
  /** Default `run_code`. */
  name?: string;
  description?: string;
  /** Languages the model may choose; the first is the default. */
  languages?: string[];
  /** The sandbox time limit in seconds for each call. */
  timeout?: number;
}

/** What the tool needs from a sandbox (a {@link Sandbox} fits). */
export interface Executor {
  exec(code: string, options?: { language?: string; timeout?: number }): Promise<ExecResult>;
}

/** Output beyond this is cut before it goes back to the model (context budget). */
export const MAX_TOOL_OUTPUT_CHARS = 20_000;

export class SandboxTool {
  readonly name: string;
  readonly description: string;
  readonly languages: string[];
  readonly timeout: number | undefined;

  constructor(private readonly sandbox: Executor, options: ToolOptions = {}) {
    this.name = options.name ?? "run_code";
    this.languages = options.languages ?? ["python", "node"];
    if (this.languages.length === 0) throw new RangeError("a tool needs at least one language");
    this.timeout = options.timeout;
    this.description =
      options.description ??
      `Run a ${this.languages.join(" or ")} program in a fresh, isolated sandbox VM (Python has numpy). ` +
        "Nothing persists between calls and there is no network: put everything in one program and " +
        "print() the values you need. Returns stdout when the program succeeds, otherwise its exit " +
        "status, stderr and stdout.";
  }

  /** The JSON schema of the tool's arguments. */
  parameters(): Record<string, unknown> {
    return {
      type: "object",
      properties: {
        code: { type: "string", description: "The complete program to run." },
        language: { type: "string", enum: [...this.languages], description: `Defaults to ${this.languages[0]}.` },
      },
      required: ["code"],
      additionalProperties: false,
    };
  }

  spec(format: ToolFormat = "openai"): Record<string, unknown> {
    switch (format) {
      case "openai":
        return { type: "function", function: { name: this.name, description: this.description, parameters: this.parameters() } };
      case "anthropic":
        return { name: this.name, description: this.description, input_schema: this.parameters() };
      case "json_schema":
        return { name: this.name, description: this.description, parameters: this.parameters() };
      default:
        throw new RangeError(`unknown tool spec format ${JSON.stringify(format)}`);
    }
  }

  /** `{code, language}` from the model's arguments (a JSON string or an object). */
  parseArguments(args: unknown): { code: string; language: string } {
    const obj = typeof args === "string" ? (JSON.parse(args) as unknown) : args;
    if (typeof obj !== "object" || obj === null || typeof (obj as { code?: unknown }).code !== "string") {
      throw new TypeError("tool arguments need a 'code' string");
    }
    const { code, language } = obj as { code: string; language?: unknown };
    return { code, language: typeof language === "string" && language ? language : this.languages[0]! };
  }

  /** Runs the model's code; resolves to the text to hand back as the tool result. */
  async call(args: unknown): Promise<string> {
    let parsed: { code: string; language: string };
    try {
      parsed = this.parseArguments(args);
    } catch (error) {
      return `error: bad tool arguments: ${(error as Error).message}`;
    }
    try {
      const options: { language: string; timeout?: number } = { language: parsed.language };
      if (this.timeout !== undefined) options.timeout = this.timeout;
      return formatResult(await this.sandbox.exec(parsed.code, options));
    } catch (error) {
      // The model's fault (e.g. a language we do not run): let it retry.
      if (error instanceof BadRequest) return `error: the sandbox refused the request: ${error.message}`;
      throw error;
    }
  }
}

/** Compact text of a run for an LLM. */
export function formatResult(result: ExecResult): string {
  if (isOk(result)) {
    let text = result.stdout.trim() ? result.stdout : "(the program printed nothing)";
    if (result.stdout_truncated) text += "\n[stdout was truncated by the sandbox]";
    return clip(text);
  }
  let head: string;
  if (result.timed_out) head = "the program was stopped: it ran past its time limit";
  else if (result.error !== null) head = `the sandbox failed (${result.error.code}): ${result.error.message}`;
  else head = `the program exited with status ${result.exit_code}`;
  const parts = [head];
  if (result.stderr) parts.push(`stderr:\n${result.stderr}`);
  if (result.stdout) parts.push(`stdout:\n${result.stdout}`);
  return clip(parts.join("\n"));
}

function clip(text: string): string {
  if (text.length <= MAX_TOOL_OUTPUT_CHARS) return text;
  const half = MAX_TOOL_OUTPUT_CHARS / 2;
  return `${text.slice(0, half)}\n[... ${text.length - 2 * half} characters cut ...]\n${text.slice(-half)}`;
}
