#!/usr/bin/env bash
# The test command (`npm test`): type check, lint, format check, then unit tests (pure, no root,
# milliseconds) and integration tests (real redis-server on spare loopback
# ports; later issues add network namespaces, which need root).
set -euo pipefail
cd "$(dirname "$0")/.."
# Node 24 from the npm registry when the machine's node is older.
. deploy/node.sh
for bin in redis-server; do
  command -v "$bin" >/dev/null || { echo "missing $bin: run 'bash .ci/run' or install deploy/packages.txt" >&2; exit 1; }
done
echo "== typecheck"
npx --no-install tsc --noEmit -p .
echo "== lint (typescript-eslint)"
npx --no-install eslint .
echo "== format (prettier --check; \`npx prettier --write .\` fixes it)"
npx --no-install prettier --check --log-level warn .
echo "== tests"
# vitest.config.ts: dist/ built first (global setup), then test/unit and
# test/integration one file at a time (integration tests start daemons and
# load the machine); the last line is "N passed, N failed[, N skipped]".
exec npx --no-install vitest run
