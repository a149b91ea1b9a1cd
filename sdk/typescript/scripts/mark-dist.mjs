// The package root has no "type", so Node would read dist/esm/*.js as
// CommonJS; a nested package.json in each build directory sets the format.
import { writeFileSync } from "node:fs";

for (const [dir, type] of [["esm", "module"], ["cjs", "commonjs"]]) {
  writeFileSync(new URL(`../dist/${dir}/package.json`, import.meta.url), JSON.stringify({ type }) + "\n");
}
