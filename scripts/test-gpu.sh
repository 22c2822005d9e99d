#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, with the binary of scripts/build-cuda.sh:
#   1. GPU numerics: every fixture family and format through the served binary against the
#      references (tests/gpu/check_fixtures.py);
#   2. the benchmark of issue 9: Qwen2.5-0.5B shape (random weights), 200-token prompts,
#      128 output tokens, streaming clients at 1..256 concurrent streams, bf16 and GGUF Q8_0;
#      and 8 requests sharing a 1000-token prefix, cold then warm.
# Results land in $OUT (default target/gpu-results). From a bundle made by
# scripts/gpu-bundle.sh: MLXD_BUNDLE=.gpu bash scripts/test-gpu.sh
#   3. (`sanitize`, not part of `all`) the GGUF Q8_0 server under compute-sanitizer, tracking
#      use-after-free of stream-ordered memory, through steps that capture decode graphs and
#      then grow every batch size: a graph must never touch memory freed after its capture.
#      Needs compute-sanitizer on PATH or in $SANITIZER.
#   4. (`deterministic`, not part of `all`) --deterministic (issue 27): the bundled trained
#      model's tokens and logprobs bit for bit alone, among 7 and 63 others, from the prefix
#      cache and after preemption (tests/gpu/check_deterministic.py); then the mode's cost,
#      total tok/s at 1, 8 and 64 streams with and without it on the Qwen2.5 0.5B and 7B
#      shapes (bf16, random weights).
#   bash scripts/test-gpu.sh [check|bench|gguf|sanitize|deterministic|all]   (bench: bf16; gguf: Q8_0)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-all}"
OUT="${OUT:-target/gpu-results}"
mkdir -p "$OUT"
if [ -n "${MLXD_BUNDLE:-}" ]; then
  xz -dc "$MLXD_BUNDLE/mlxd.xz" > /tmp/mlxd && chmod +x /tmp/mlxd
  [ -f "$MLXD_BUNDLE/shared/tokenizers/qwen2.5/tokenizer.json.xz" ] \
    && xz -dk "$MLXD_BUNDLE/shared/tokenizers/qwen2.5/tokenizer.json.xz"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$MLXD_BUNDLE"/whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  BIN=/tmp/mlxd SHARED="$MLXD_BUNDLE/shared"
else
  BIN="${MLXD_BIN:-target/cuda/release/mlxd}" SHARED="${MLXD_SHARED:-../shared}"
fi
# cuBLAS, cuRAND and NVRTC 13 from the CUDA wheels beside PyTorch; the driver brings libcuda.
NVLIB="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)"
export LD_LIBRARY_PATH="$NVLIB:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0

if [ "$MODE" = check ] || [ "$MODE" = all ]; then
  python3 tests/gpu/check_fixtures.py --bin "$BIN" --fixtures "$SHARED/fixtures" --out "$OUT/check.txt" || status=1
  # The bf16 fixtures again without the tensor-core prefill attention (every row on the
  # scalar paged kernel, the fallback; benches/prefill_vs_f32.py compares the two against a
  # float32 run on a bigger model).
  MLXD_CUDA_PREFILL_KERNEL=0 python3 tests/gpu/check_fixtures.py --bin "$BIN" --fixtures "$SHARED/fixtures" \
    --only bf16 --out "$OUT/check-scalar-attention.txt" || status=1
  # The tests/data families (their labels carry the folder in parentheses) again with the
  # experts grouped on the device (compute/cuda/moe.cuh, opt-in until this pass has run on a
  # GPU): bf16 folders and Q8_0 GGUF experts against the same references, and a request alone
  # and among 7 others in bf16 (on the scalar attention kernel, as qwen2's).
  MLXD_CUDA_GROUPED_EXPERTS=1 python3 tests/gpu/check_fixtures.py --bin "$BIN" --fixtures "$SHARED/fixtures" \
    --only "(" --out "$OUT/check-grouped-experts.txt" || status=1
  MLXD_CUDA_GROUPED_EXPERTS=1 MLXD_CUDA_PREFILL_KERNEL=0 python3 tests/gpu/check_fixtures.py --bin "$BIN" \
    --fixtures "$SHARED/fixtures" --only "bf16 batch invariance" --out "$OUT/check-grouped-invariance.txt" || status=1
  # The quantized GGUF files again with candle's exact dequantizing matmuls instead of its
  # q8_1-activation kernels, against llama.cpp's dequantized-f32 run: the same arithmetic.
  MLXD_CUDA_FORCE_DMMV=1 python3 tests/gpu/check_fixtures.py --bin "$BIN" --fixtures "$SHARED/fixtures" \
    --only gguf --out "$OUT/check-dmmv.txt" || status=1
fi

serve_and_bench() {  # name, model, extra serve flags...
  local name="$1" model="$2"; shift 2
  local port=18080 log="$OUT/serve-$name.log"
  "$BIN" serve --model "$model" --device cuda --port $port --max-seqs 256 --max-batch-tokens 4096 \
    --max-model-len 4096 "$@" 2> "$log" &
  local pid=$!
  for _ in $(seq 600); do curl -sf localhost:$port/health > /dev/null && break; sleep 0.2; done
  local url="http://127.0.0.1:$port"
  {
    echo "## $name: where one batch-1 decode step goes (after a warm-up: kernels JIT-compile on first use)"
    "$BIN" bench --url "$url" --concurrency 1 --requests-per-client 2 --prompt-tokens 32 \
      --output-tokens 64 > /dev/null
    python3 scripts/step_phases.py "$url" snapshot /tmp/phases.json
    "$BIN" bench --url "$url" --concurrency 1 --requests-per-client 4 --prompt-tokens 32 \
      --output-tokens 128 > /dev/null
    python3 scripts/step_phases.py "$url" /tmp/phases.json
    echo "## $name"
    "$BIN" bench --url "$url" --concurrency 1,8,32,64,128,256 --requests-per-client 2 \
      --prompt-tokens 200 --output-tokens 128
    nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/GPU memory used: /'
    echo "### sampled (temperature 0.7, top_p 0.9: every row through the device sampler)"
    "$BIN" bench --url "$url" --concurrency 1,64 --requests-per-client 2 --prompt-tokens 200 \
      --output-tokens 128 --temperature 0.7 --top-p 0.9
    echo "### 8 requests at once sharing a 1000-token prefix: cold, then warm"
    "$BIN" bench --url "$url" --concurrency 8 --requests-per-client 1 --prompt-tokens 1000 \
      --output-tokens 16 --shared-prefix 0.99 --seed 7
    "$BIN" bench --url "$url" --concurrency 8 --requests-per-client 1 --prompt-tokens 1000 \
      --output-tokens 16 --shared-prefix 0.99 --seed 7
    echo "### server health after the runs, and its warnings and errors"
    curl -s -m 5 "$url/health"; echo
    grep -E " (WARN|ERROR) " "$log" | cut -c1-300 | head -20
  } 2>&1 | tee "$OUT/bench-$name.txt"
  kill "$pid"; wait "$pid" 2>/dev/null
}

sanitize() {  # model
  local port=18081 log="$OUT/sanitize.log" url="http://127.0.0.1:18081"
  "${SANITIZER:-compute-sanitizer}" --tool memcheck --track-stream-ordered-races all \
    --error-exitcode 86 --log-file "$OUT/sanitizer.txt" \
    "$BIN" serve --model "$1" --device cuda --port $port --max-seqs 100 --max-batch-tokens 120 \
    --max-model-len 1024 2> "$log" &
  local pid=$!
  for _ in $(seq 3000); do
    curl -sf localhost:$port/health > /dev/null && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.2
  done
  # Batch sizes up, down and up again, so that graphs captured at small sizes replay after
  # larger steps ran; 100 streams (48 tokens each, so they decode together) pad to the
  # 128-row bucket, past the 120-token budget.
  for c in 1 8 1 32 2 100 4; do
    "$BIN" bench --url "$url" --concurrency $c --requests-per-client 1 --prompt-tokens 24 \
      --output-tokens 48 > /dev/null || status=1
  done
  curl -s -m 5 "$url/health"; echo
  grep -o "decode steps batch=[0-9]*" "$log" | sort -u | tr '\n' ' '; echo
  pkill -INT -x mlxd; wait "$pid"; local rc=$?  # the server, not the sanitizer around it
  echo "compute-sanitizer exit $rc (86: errors found)"
  grep -E "ERROR SUMMARY|Invalid|freed|race" "$OUT/sanitizer.txt" | head -20
  grep -E " (WARN|ERROR) " "$log" | cut -c1-300 | head -10
  [ "$rc" = 0 ] || status=1
}

deterministic_cost() {  # shape
  local model=/tmp/qwen25-det-$1 port=18082 url="http://127.0.0.1:18082"
  [ -d "$model" ] || python3 "$SHARED/tools/bench/make_random_qwen25.py" --shape "$1" --fast \
    --tokenizer-dir "$SHARED/tokenizers/qwen2.5" --out "$model" --seed 0 > "$OUT/make-model-$1.log" 2>&1
  for flag in "" --deterministic; do
    "$BIN" serve --model "$model" --device cuda --port $port --max-seqs 64 --max-model-len 4096 \
      --dtype bf16 $flag 2> "$OUT/serve-deterministic-$1$flag.log" &
    local pid=$!
    for _ in $(seq 1500); do curl -sf localhost:$port/health > /dev/null && break; sleep 0.2; done
    echo "## Qwen2.5 $1 shape, bf16 ${flag:-(default mode)}"
    "$BIN" bench --url "$url" --concurrency 1,8,64 --requests-per-client 2 --prompt-tokens 200 \
      --output-tokens 128
    kill "$pid"; wait "$pid" 2>/dev/null
  done 2>&1 | tee -a "$OUT/deterministic-cost.txt"
}

if [ "$MODE" = deterministic ]; then
  # Opt-in on a GPU until this pass has run on one (engine::core::gpu_deterministic_verified).
  export MLXD_CUDA_DETERMINISTIC=1
  python3 tests/gpu/check_deterministic.py --bin "$BIN" --out "$OUT/check-deterministic.txt" || status=1
  deterministic_cost 0.5b
  deterministic_cost 7b
fi

M=/tmp/qwen25-0.5b
if [ "$MODE" != check ] && [ ! -d "$M" ]; then
  python3 "$SHARED/tools/bench/make_random_qwen25.py" \
    --tokenizer-dir "$SHARED/tokenizers/qwen2.5" --out "$M" --seed 0 > "$OUT/make-model.log" 2>&1
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  serve_and_bench bf16 "$M" --dtype bf16
fi
if [ "$MODE" = gguf ] || [ "$MODE" = all ]; then
  python3 benches/make_gguf.py "$M" "$M" > "$OUT/make-gguf.log" 2>&1 || status=1
  serve_and_bench gguf-q8_0 "$M-q8_0.gguf"
fi
if [ "$MODE" = sanitize ]; then
  [ -f "$M-q8_0.gguf" ] || python3 benches/make_gguf.py "$M" "$M" > "$OUT/make-gguf.log" 2>&1 || status=1
  sanitize "$M-q8_0.gguf"
fi
exit $status
