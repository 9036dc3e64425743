#!/usr/bin/env bash
# `make e2e`: the end-to-end tests on a real node, one test at a time (they
# share the node and the operator's release), with their figures printed.
#   1. the node mode's own tests (crates/testenv/tests/node.rs): a node
#      dropped, panicked and SIGKILLed leaves nothing behind;
#   2. the e2e scenarios (tests/e2e): one node for the whole run.
# Neither target runs in `cargo test` (both are `test = false`). Fails when a
# test fails or when no test ran; the log is in $TARGET/e2e.log.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
log=$target/e2e.log
mkdir -p "$target"
: > "$log"
cargo=${CARGO:-cargo}
begun=$SECONDS

run() {
  echo "e2e: cargo test $*" | tee -a "$log"
  "$cargo" test "$@" -- --test-threads=1 --nocapture 2>&1 | tee -a "$log"
}

status=0
run -p saleslayer-testenv --test node || status=$?
run --test e2e || status=$?

# The run's node is a static: its janitor removes it once the test binary
# has exited. Wait for that, so nothing of it outlives `make e2e`.
tmp=${TMPDIR:-/tmp}
for _ in $(seq 1 600); do
  compgen -G "$tmp/saleslayer-node-*" > /dev/null || break
  sleep 0.1
done
if compgen -G "$tmp/saleslayer-node-*" > /dev/null; then
  echo "e2e: a node's directory is still there (another run, or a janitor that failed):" $tmp/saleslayer-node-* >&2
fi

passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | awk '{s += $6} END {print s + 0}')
echo "e2e: $passed passed, $failed failed in $((SECONDS - begun)) s"
if [[ $status -ne 0 || $failed -ne 0 ]]; then
  exit 1
fi
if [[ $passed -eq 0 ]]; then
  echo "e2e: no test ran" >&2
  exit 1
fi
