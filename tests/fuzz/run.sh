#!/usr/bin/env bash
# Property-based fuzzing of every route against the server's own OpenAPI document (schemathesis,
# every check, auth on), then the official OpenAI Python SDK against /v1/images/generations, both
# on the real binary serving a random-weights model. Run by .ci/run after the tests.
#   FUZZ_EXAMPLES  examples per operation and phase (default 300: about 2,000+ requests)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${FLOWGEN_FUZZ_VENV:-target/fuzz-venv}
if [ ! -x "$venv/bin/schemathesis" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis==4.32.5' 'openai==3.57.0'
fi
cargo build --quiet --locked -p flowgen-cli --bin flowgen
flowgen=target/debug/flowgen
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$flowgen" model init-random --out "$work/model" --seed 5 >/dev/null
FLOWGEN_AUTH__API_KEYS='["fuzz-key-one","fuzz-key-two"]' "$flowgen" serve --listen 127.0.0.1:0 \
  --data-dir "$work/data" --model "$work/model" >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 200); do grep -q "flowgen serving" "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
base=$(grep -o 'http://[0-9.:]*' "$work/serve.out" | head -1)
[ -n "$base" ] || { cat "$work/serve.log"; echo "the server did not start" >&2; exit 1; }
for _ in $(seq 300); do curl -sf "$base/ready" >/dev/null && break; sleep 0.1; done
model=$(curl -sf -H 'Authorization: Bearer fuzz-key-one' "$base/v1/models" | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

"$venv/bin/schemathesis" run "$base/openapi.json" -H 'Authorization: Bearer fuzz-key-one' \
  --checks all --max-examples "${FUZZ_EXAMPLES:-300}" --workers 2 --seed 20261202 \
  --suppress-health-check too_slow
"$venv/bin/python" tests/fuzz/openai_sdk.py "$base" fuzz-key-one "$model"
if grep -q panicked "$work/serve.log"; then grep -B2 -A8 panicked "$work/serve.log"; exit 1; fi
echo "fuzzing and the OpenAI SDK passed"
