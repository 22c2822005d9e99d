#!/usr/bin/env bash
# Real coding agents against mlxd, on the Qwen2.5-0.5B-shaped random model with its real chat
# template, through tests/agents/log_proxy.py (which logs every request with its answer):
#   - Claude Code (`claude -p`, Anthropic's Messages API; its ~20k-token system prompt and 24 tools);
#   - Codex CLI (`codex exec`, OpenAI's Responses API; its ~12k-token instructions, function and
#     namespaced tools and hosted web search), run twice, as two sessions of one user.
#
#   bash tests/agents/run_agents.sh            (WORK=/tmp/mlxd-agents by default; needs node/npm)
#
# Passes when every request was answered 2xx, every streamed answer ended with its API's last
# event, and each agent ended cleanly or only because the random model never ends its turn:
# replies are capped at 64 tokens (Claude Code's CLAUDE_CODE_MAX_OUTPUT_TOKENS; for Codex, which
# sets no limit, mlxd's --default-max-tokens), and each agent reports that cap its own way.
# Prints each agent's prefix-cache hit rate over its requests (mlxd's /metrics).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
SHARED="${MLXD_SHARED:-$ROOT/../shared}"
WORK="${WORK:-/tmp/mlxd-agents}"
CLAUDE_CODE_VERSION=2.1.197
CODEX_VERSION=0.171.0
mkdir -p "$WORK"

# The agents, pinned, and the model (the shared maker, seed 0), once.
BIN="$WORK/npm/node_modules/.bin"
if [ ! -x "$BIN/claude" ] || [ ! -x "$BIN/codex" ]; then
  npm install --silent --prefix "$WORK/npm" "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION"
fi
if [ ! -f "$WORK/q05/model.safetensors" ]; then
  [ -x "$WORK/venv/bin/python" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q numpy; }
  "$WORK/venv/bin/python" "$SHARED/tools/bench/make_random_qwen25.py" \
    --tokenizer-dir "$SHARED/tokenizers/qwen2.5" --out "$WORK/q05" --seed 0
fi
cargo build --release --locked --bin mlxd

PORT=18601 PROXY=18600 LOG="$WORK/requests.jsonl"
rm -f "$LOG"
target/release/mlxd serve --model "$WORK/q05" --served-model-name qwen --port $PORT --default-max-tokens 64 \
  2> "$WORK/mlxd.log" &
SERVER=$!
python3 tests/agents/log_proxy.py --listen $PROXY --target "http://127.0.0.1:$PORT" --log "$LOG" &
PROXY_PID=$!
trap 'kill $SERVER $PROXY_PID 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.2; done
metrics() { curl -s "localhost:$PORT/metrics" > "$WORK/metrics.$1"; }
metrics start

echo "## Claude Code $CLAUDE_CODE_VERSION: claude -p"
claude_status=0
HOME="$WORK/home" ANTHROPIC_BASE_URL="http://127.0.0.1:$PROXY" ANTHROPIC_API_KEY=local \
  ANTHROPIC_MODEL=qwen ANTHROPIC_SMALL_FAST_MODEL=qwen ANTHROPIC_DEFAULT_HAIKU_MODEL=qwen \
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 CLAUDE_CODE_MAX_OUTPUT_TOKENS=64 \
  timeout 1200 "$BIN/claude" -p "Say hi" --max-turns 1 > "$WORK/claude.out" 2>&1 || claude_status=$?
tail -3 "$WORK/claude.out"
metrics claude

echo "## Codex CLI $CODEX_VERSION: codex exec (two sessions)"
mkdir -p "$WORK/codex-home" "$WORK/codex-work"
cat > "$WORK/codex-home/config.toml" <<EOF
model = "qwen"
model_provider = "mlxd"
[model_providers.mlxd]
name = "mlxd"
base_url = "http://127.0.0.1:$PROXY/v1"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 1200000
EOF
codex_status=""
rm -f "$WORK/codex.all"
for prompt in "Say hi" "Say bye"; do
  status=0
  (cd "$WORK/codex-work" && CODEX_HOME="$WORK/codex-home" timeout 1200 "$BIN/codex" exec --skip-git-repo-check \
    "$prompt") > "$WORK/codex.out" 2>&1 || status=$?
  tail -3 "$WORK/codex.out"
  cat "$WORK/codex.out" >> "$WORK/codex.all"
  codex_status="$codex_status $status"
done
metrics codex

python3 - "$LOG" "$WORK" "$claude_status" "$codex_status" <<'EOF'
import json, re, sys
log, work, claude_status, codex_status = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
posts = [json.loads(line) for line in open(log)]
posts = [r for r in posts if r["method"] == "POST"]
last_event = {"/v1/messages": ["message_stop"], "/v1/responses": ["response.completed", "response.incomplete"]}
bad = []
for r in posts:
    path = r["path"].split("?")[0]
    streamed = isinstance(r["request"], dict) and r["request"].get("stream")
    if r["status"] >= 300:
        bad.append(f"{path}: {r['status']} {r['answer'][:300]}")
    elif streamed and path in last_event and not r["client_left"] and not any(
            f"event: {e}" in r["answer"] for e in last_event[path]):
        bad.append(f"{path}: the stream did not end with {' or '.join(last_event[path])}")
    number = lambda key: (re.findall(rf'"{key}":(\d+)', r["answer"]) or [None])[-1]
    left = " (the agent closed it)" if r["client_left"] else ""
    print(f"{path} {r['status']}{left}: input {number('input_tokens')},"
          f" cached {number('cache_read_input_tokens') or number('cached_tokens')}, output {number('output_tokens')}")

def hit_rate(before, after):
    value = lambda text, name: float(re.search(rf"^mlxd_{name}_total\S* (\S+)$", text, re.M).group(1))
    a, b = open(f"{work}/metrics.{before}").read(), open(f"{work}/metrics.{after}").read()
    queries = value(b, "prefix_cache_queries") - value(a, "prefix_cache_queries")
    hits = value(b, "prefix_cache_hits") - value(a, "prefix_cache_hits")
    return f"{hits:.0f} of {queries:.0f} prompt tokens ({hits / max(queries, 1):.1%})"

count = lambda prefix: sum(r["path"].startswith(prefix) for r in posts)
print(f"Claude Code: {count('/v1/messages')} requests; prefix cache {hit_rate('start', 'claude')}")
print(f"Codex: {count('/v1/responses')} requests; prefix cache {hit_rate('claude', 'codex')}")
claude_out, codex_out = open(f"{work}/claude.out").read(), open(f"{work}/codex.all").read()
# The cap, as each agent reports it: Claude Code's one "output token maximum" error; Codex's
# "Incomplete response returned, reason: max_output_tokens" once per session.
claude_ok = claude_status == 0 or (claude_status == 1 and "output token maximum" in claude_out
                                   and claude_out.count("API Error") == 1)
codex_ok = all(s == "0" for s in codex_status) or (
    all(s in ("0", "1") for s in codex_status)
    and codex_out.count("reason: max_output_tokens") >= codex_status.count("1")
    and "stream disconnected" not in codex_out and "unexpected status" not in codex_out)
if not count("/v1/messages") or not count("/v1/responses") or bad or not claude_ok or not codex_ok:
    print("FAIL:", *bad, f"claude exited {claude_status}: {claude_out[-400:]}",
          f"codex exited {codex_status}: {codex_out[-800:]}", sep="\n  ")
    sys.exit(1)
print("PASS: every request answered and parsed")
EOF
