#!/usr/bin/env bash
# Serving benchmark: time to first token (p50/p99) and aggregate generated tokens/s at 1, 8,
# 32 and 64 concurrent streaming clients, against `rewind serve` on the default model.
#
#   bench/serve.sh [--format f32|quantized] [--max-tokens N] [--rounds R] [--url URL]
#
# Without --url it builds and starts a server on a free port and stops it afterwards. Prints a
# markdown table (append it to docs/benchmarks.md). Needs python3 (standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."

FORMAT=quantized
MAX_TOKENS=64
ROUNDS=2
URL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --format) FORMAT="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --url) URL="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true; }
trap cleanup EXIT

if [ -z "$URL" ]; then
    cargo build --release --quiet
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    DATA=$(mktemp -d)
    ./target/release/rewind serve --port "$PORT" --format "$FORMAT" --data-dir "$DATA" >"$DATA/serve.log" 2>&1 &
    SERVER_PID=$!
    URL="http://127.0.0.1:$PORT"
    for _ in $(seq 600); do
        curl -sf "$URL/health" >/dev/null 2>&1 && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$DATA/serve.log" >&2; exit 1; }
        sleep 0.1
    done
fi

python3 - "$URL" "$MAX_TOKENS" "$ROUNDS" "$FORMAT" <<'PY'
import json, sys, threading, time, urllib.request

url, max_tokens, rounds, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
prompts = ["Write a short story about a lighthouse keeper.", "Explain how rainbows form.",
           "List some good habits for programmers.", "Describe the city of Paris."]

def one(i, ttfts, tokens):
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                       "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req) as res:
        for raw in res:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens.append(chunk["usage"]["completion_tokens"])
    ttfts.append(first if first is not None else time.perf_counter() - start)

def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

print(f"Model `{model}` ({fmt}), {max_tokens} tokens per request, temperature 0.7, {rounds} rounds per client.\n")
print("| concurrent streams | requests | TTFT p50 (s) | TTFT p99 (s) | aggregate tokens/s |")
print("|---:|---:|---:|---:|---:|")
one(0, [], [])  # warm-up
for clients in (1, 8, 32, 64):
    ttfts, tokens = [], []
    def client(c):
        for r in range(rounds):
            one(c * rounds + r, ttfts, tokens)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - start
    print(f"| {clients} | {len(ttfts)} | {pct(ttfts, 50):.3f} | {pct(ttfts, 99):.3f} | {sum(tokens) / wall:.1f} |", flush=True)
PY
