#!/usr/bin/env bash
# Runs Schemathesis (from PyPI; installed when missing) against a live
# cronguard with the served OpenAPI document: every check, every phase
# (examples, coverage, fuzzing, stateful via the document's links), and
# fails on any 5xx, schema violation or other check failure.
# Usage: tests/schemathesis/run.sh [path/to/cronguard] [max-examples]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/debug/cronguard}
examples=${2:-60}
command -v schemathesis >/dev/null || python3 -m pip install --quiet 'schemathesis>=4,<5'
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token="schemathesis-admin-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
"$bin" serve --listen "127.0.0.1:$port" --database "$work/cronguard.db" --log warn \
  --token "schemathesis:admin:$token" >"$work/cronguard.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 60); do curl -sf "$base/readyz" >/dev/null && break; sleep 0.5; done

status=0
# One worker: with two threads, Hypothesis's lambda introspection (ast.parse)
# can hit CPython 3.11's "AST constructor recursion depth mismatch" race
# (python/cpython#106905), an error of the tool, not of the API.
# The two Server-Sent Events streams (GET /v1/events, GET
# /v1/runs/{run}/output) answer a body that ends only when the client
# leaves (or the run ends), which a request-response fuzzer cannot read:
# they are left out here; their problems (400 on a bad filter, 404, 503
# past the subscriber limit) are tested in tests/it/events.rs.
schemathesis --config-file "$here/schemathesis.toml" run "$base/openapi.json" \
  -H "Authorization: Bearer $token" \
  --exclude-path /v1/events \
  --exclude-path '/v1/runs/{run}/output' \
  --checks all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" \
  --workers 1 \
  --seed 20261125 \
  >"$work/output" 2>&1 || status=$?
cat "$work/output"

# How many requests were generated (the acceptance asks for at least 2,000).
generated=$(grep -Eo '[0-9]+ generated' "$work/output" | tail -1 | cut -d' ' -f1 || true)
echo "schemathesis: ${generated:-0} test cases generated, exit status $status"
if [ "${generated:-0}" -lt "${MIN_CASES:-0}" ]; then
  echo "fewer than MIN_CASES=$MIN_CASES test cases" >&2; status=1
fi
if grep -q 'panicked' "$work/cronguard.log"; then
  echo "cronguard panicked:" >&2; grep -m5 'panicked' "$work/cronguard.log" >&2; status=1
fi
exit "$status"
