#!/usr/bin/env node
// Client-side latency of the TypeScript SDK against a live kvmfork server.
//
// Runs `--requests` sequential exec calls (after a warm-up) and prints
// percentiles of the caller's wall time, the server's total_time_ms, and
// their difference: what HTTP, JSON and the SDK add.
//
//   (cd sdk/typescript && npm ci && npm run build)
//   KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_API_KEY=...] node sdk/bench/overhead.mjs --requests 200
import { parseArgs } from "node:util";

import { Sandbox, isOk } from "../typescript/dist/esm/index.js";

const PERCENTILES = [50, 90, 99, 99.9];

function percentile(sorted, p) {
  // Nearest rank.
  const rank = Math.max(1, Math.min(sorted.length, Math.round((p / 100) * sorted.length + 0.5)));
  return sorted[rank - 1];
}

function report(name, values) {
  const sorted = [...values].sort((a, b) => a - b);
  const cells = PERCENTILES.map((p) => `p${p}=${percentile(sorted, p).toFixed(3).padStart(8)}`).join("  ");
  console.log(`${name.padEnd(22)} ${cells}  max=${sorted.at(-1).toFixed(3).padStart(8)}  (ms, n=${sorted.length})`);
}

const { values: args } = parseArgs({
  options: { requests: { type: "string", short: "n", default: "200" }, warmup: { type: "string", default: "10" }, code: { type: "string", default: "print(1 + 1)" } },
});
if (!process.env.KVMFORK_URL) {
  console.error("KVMFORK_URL must point at a running kvmfork server");
  process.exit(2);
}
const requests = Number(args.requests);
const warmup = Number(args.warmup);
const sb = new Sandbox();
const walls = [];
const servers = [];
const overheads = [];
for (let i = 0; i < warmup + requests; i++) {
  const started = performance.now();
  const result = await sb.exec(args.code);
  const wall = performance.now() - started;
  if (!isOk(result)) {
    console.error(`run failed: exit ${result.exit_code}, ${JSON.stringify(result.error)}, ${result.stderr.slice(-300)}`);
    process.exit(1);
  }
  if (i >= warmup) {
    walls.push(wall);
    servers.push(result.total_time_ms);
    overheads.push(wall - result.total_time_ms);
  }
}
console.log(`kvmfork TypeScript SDK, sequential exec of ${JSON.stringify(args.code)} against ${process.env.KVMFORK_URL}`);
report("wall (caller)", walls);
report("server total_time_ms", servers);
report("wall - server", overheads);
