#!/usr/bin/env bash
# The test command (`npm test`): type check, then unit tests (pure, no root,
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
echo "== build"
node build.mjs
echo "== tests"
# Files written for vitest (the runner the tests are moving to) cannot run
# under node --test: until the move, they run apart with vitest.
mapfile -t node_tests < <(grep -L "from \"vitest\"" test/unit/*.test.ts test/integration/*.test.ts)
mapfile -t vitest_tests < <(grep -l "from \"vitest\"" test/unit/*.test.ts test/integration/*.test.ts || true)
# One file at a time: integration tests start daemons and load the machine.
node --import tsx --test --test-concurrency=1 "${node_tests[@]}"
if [ "${#vitest_tests[@]}" -gt 0 ]; then
  exec npx --no-install vitest run --no-file-parallelism "${vitest_tests[@]}"
fi
