#!/usr/bin/env bash
# Real coding agents against mlxd: Claude Code (`claude -p`, Anthropic's Messages API) runs a
# one-prompt session against `mlxd serve` on the Qwen2.5-0.5B-shaped random model with its real
# chat template and Claude Code's own ~20k-token system prompt and 24 tools. Every request the
# agent sends goes through tests/agents/log_proxy.py, which logs it with its answer.
#
#   bash tests/agents/run_agents.sh            (WORK=/tmp/mlxd-agents by default; needs node/npm)
#
# Passes when every request was answered 2xx, every streamed answer ended with `message_stop`,
# and the agent ended cleanly or only because the random model never ends its turn (it reports
# that its reply hit the output limit, which the run caps at 64 tokens: the text is noise).
# Prints the prefix-cache hit rate over the run's requests (mlxd's /metrics).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
SHARED="${MLXD_SHARED:-$ROOT/../shared}"
WORK="${WORK:-/tmp/mlxd-agents}"
CLAUDE_CODE_VERSION=2.1.197
mkdir -p "$WORK"

# The agent, pinned, and the model (the shared maker, seed 0), once.
[ -x "$WORK/npm/node_modules/.bin/claude" ] ||
  npm install --silent --prefix "$WORK/npm" "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
if [ ! -f "$WORK/q05/model.safetensors" ]; then
  [ -x "$WORK/venv/bin/python" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q numpy; }
  "$WORK/venv/bin/python" "$SHARED/tools/bench/make_random_qwen25.py" \
    --tokenizer-dir "$SHARED/tokenizers/qwen2.5" --out "$WORK/q05" --seed 0
fi
cargo build --release --locked --bin mlxd

PORT=18601 PROXY=18600 LOG="$WORK/requests.jsonl"
rm -f "$LOG"
target/release/mlxd serve --model "$WORK/q05" --served-model-name qwen --port $PORT 2> "$WORK/mlxd.log" &
SERVER=$!
python3 tests/agents/log_proxy.py --listen $PROXY --target "http://127.0.0.1:$PORT" --log "$LOG" &
PROXY_PID=$!
trap 'kill $SERVER $PROXY_PID 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.2; done

echo "## Claude Code $CLAUDE_CODE_VERSION: claude -p"
status=0
HOME="$WORK/home" ANTHROPIC_BASE_URL="http://127.0.0.1:$PROXY" ANTHROPIC_API_KEY=local \
  ANTHROPIC_MODEL=qwen ANTHROPIC_SMALL_FAST_MODEL=qwen ANTHROPIC_DEFAULT_HAIKU_MODEL=qwen \
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 CLAUDE_CODE_MAX_OUTPUT_TOKENS=64 \
  timeout 1200 "$WORK/npm/node_modules/.bin/claude" -p "Say hi" --max-turns 1 > "$WORK/claude.out" 2>&1 || status=$?
tail -3 "$WORK/claude.out"
METRICS="$(curl -s "localhost:$PORT/metrics")"

python3 - "$LOG" "$status" "$WORK/claude.out" "$METRICS" <<'EOF'
import json, re, sys
log, status, out, metrics = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), sys.argv[4]
posts = [json.loads(line) for line in open(log)]
posts = [r for r in posts if r["method"] == "POST"]
bad = []
for r in posts:
    streamed = isinstance(r["request"], dict) and r["request"].get("stream")
    if r["status"] >= 300:
        bad.append(f"{r['path']}: {r['status']} {r['answer'][:300]}")
    elif streamed and "event: message_stop" not in r["answer"] and not r["client_left"]:
        bad.append(f"{r['path']}: the stream did not end with message_stop")
    usage = re.findall(r'"usage":(\{[^}]*\})', r["answer"])
    u = json.loads(usage[-1]) if usage else {}
    system = r["request"].get("system") if isinstance(r["request"], dict) else None
    head = (system[0]["text"] if isinstance(system, list) else system or "")[:60].replace("\n", " ")
    left = " (the agent closed it)" if r["client_left"] else ""
    print(f"{r['path']} {r['status']}{left}: input {u.get('input_tokens')}, cached {u.get('cache_read_input_tokens')},"
          f" output {u.get('output_tokens')}; system starts {head!r}")
value = lambda name: float(re.search(rf"^mlxd_{name}_total\S* (\S+)$", metrics, re.M).group(1))
queries, hits = value("prefix_cache_queries"), value("prefix_cache_hits")
print(f"{len(posts)} requests; prefix cache: {hits:.0f} of {queries:.0f} prompt tokens ({hits / max(queries, 1):.1%})")
ended_cleanly = status == 0 or (status == 1 and "output token maximum" in out and out.count("API Error") == 1)
if not posts or bad or not ended_cleanly:
    print("FAIL:", *bad, f"claude exited {status}: {out[-500:]}", sep="\n  ")
    sys.exit(1)
print("PASS: every request answered and parsed")
EOF
