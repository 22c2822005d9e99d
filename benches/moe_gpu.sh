#!/usr/bin/env bash
# Issue 21's GPU rows: a Qwen3-30B-A3B-shaped mixture of experts (random weights from
# benches/make_moe_gguf.py: its widths, LAYERS of its 48 layers, 8 distinct experts per layer
# repeated to 128, so the files take seconds to make) as a Q8_0 GGUF served by llama-server
# (built on the GPU machine with CUDA from the pinned llama.cpp tree) and by mlxd, with the
# experts grouped on the device (MLXD_CUDA_GROUPED_EXPERTS=1) and one expert at a time (today's
# default), and as a bf16 Hugging Face folder served by mlxd both ways. One client,
# `mlxd bench`: 200-token prompts, 128 output tokens, 1 and 64 streams.
#
#   bash benches/moe_gpu.sh pack     # here, after scripts/gpu-bundle.sh: the llama.cpp tree
#                                    # (/work/bench/llama.cpp, from the sdist vs_llama_cpp.sh pins)
#                                    # into .gpu/llama.cpp.tar.xz
#   then on the GPU machine, from the bundle (MLXD_BUNDLE=.gpu, as scripts/test-gpu.sh):
#   bash benches/moe_gpu.sh build    # llama-server with CUDA into $WORK (minutes; may run beside)
#   bash benches/moe_gpu.sh model    # the GGUF and the bf16 folder into $WORK
#   bash benches/moe_gpu.sh mlxd     # mlxd's rows
#   bash benches/moe_gpu.sh llama    # llama-server's row (waits for the build)
# Results: $OUT/moe-<server>-<kind>.txt (OUT defaults to target/gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:?pack, build, model, mlxd or llama}"
WORK="${WORK:-/tmp/moe-gpu}"
OUT="${OUT:-target/gpu-results}"
LAYERS="${LAYERS:-8}"
BUNDLE="${MLXD_BUNDLE:-.gpu}"
PORT=18090
mkdir -p "$WORK" "$OUT"

case "$MODE" in
pack)
  tar -C /work/bench -cJf "$BUNDLE/llama.cpp.tar.xz" --exclude=llama.cpp/build --exclude=llama.cpp/models \
    --exclude=llama.cpp/docs --exclude=llama.cpp/media --exclude=llama.cpp/tools/server/webui llama.cpp
  du -sh "$BUNDLE/llama.cpp.tar.xz"
  exit 0
  ;;
build)
  rm -rf "$WORK/llama.cpp" && tar -C "$WORK" -xJf "$BUNDLE/llama.cpp.tar.xz"
  cmake -S "$WORK/llama.cpp" -B "$WORK/llama.cpp/build" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_TYPE=Release > "$WORK/llama-build.log" 2>&1 \
    && cmake --build "$WORK/llama.cpp/build" --target llama-server -j "$(nproc)" >> "$WORK/llama-build.log" 2>&1
  rc=$?
  echo "llama-server build exit $rc" | tee -a "$WORK/llama-build.log"
  touch "$WORK/llama-build.done"
  exit $rc
  ;;
model)
  [ -f "$BUNDLE/shared/tokenizers/qwen2.5/tokenizer.json" ] || xz -dk "$BUNDLE/shared/tokenizers/qwen2.5/tokenizer.json.xz"
  python3 benches/make_moe_gguf.py --tokenizer-dir "$BUNDLE/shared/tokenizers/qwen2.5" --out "$WORK/moe" \
    --layers "$LAYERS" --kinds q8_0 --distinct-experts 8 --hf-bf16 "$WORK/moe-bf16"
  exit $?
  ;;
esac

BIN="${MLXD_BIN:-/tmp/mlxd}"
[ -x "$BIN" ] || { xz -dc "$BUNDLE/mlxd.xz" > "$BIN" && chmod +x "$BIN"; }
NVLIB="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)"
export LD_LIBRARY_PATH="$NVLIB:${LD_LIBRARY_PATH:-}"

wait_up() {  # pid, log
  for _ in $(seq 1500); do
    curl -sf "localhost:$PORT/health" > /dev/null && return 0
    kill -0 "$1" 2> /dev/null || { tail -5 "$2"; return 1; }
    sleep 0.2
  done
  return 1
}
bench() {  # name, pid, log
  local url="http://127.0.0.1:$PORT"
  {
    echo "## $1"
    "$BIN" bench --url "$url" --concurrency 1 --requests-per-client 1 --prompt-tokens 32 --output-tokens 16 > /dev/null
    "$BIN" bench --url "$url" --concurrency 1,64 --requests-per-client 2 --prompt-tokens 200 --output-tokens 128
    nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/GPU memory used: /'
    grep -E " (WARN|ERROR) " "$3" | cut -c1-300 | head -5
  } 2>&1 | tee "$OUT/moe-$1.txt"
  kill "$2"; wait "$2" 2> /dev/null
}
serve_mlxd() {  # name, model, env...
  local name="$1" model="$2"; shift 2
  env "$@" "$BIN" serve --model "$model" --device cuda --port $PORT --max-seqs 256 --max-batch-tokens 4096 \
    --max-model-len 4096 2> "$OUT/serve-moe-$name.log" &
  local pid=$!
  wait_up $pid "$OUT/serve-moe-$name.log" && bench "$name" $pid "$OUT/serve-moe-$name.log"
}

if [ "$MODE" = mlxd ]; then
  serve_mlxd mlxd-q8_0 "$WORK/moe-q8_0.gguf" MLXD_CUDA_GROUPED_EXPERTS=1
  serve_mlxd mlxd-q8_0-per-expert "$WORK/moe-q8_0.gguf" MLXD_CUDA_GROUPED_EXPERTS=0
  serve_mlxd mlxd-bf16 "$WORK/moe-bf16" MLXD_CUDA_GROUPED_EXPERTS=1
  serve_mlxd mlxd-bf16-per-expert "$WORK/moe-bf16" MLXD_CUDA_GROUPED_EXPERTS=0
elif [ "$MODE" = llama ]; then
  for _ in $(seq 600); do [ -f "$WORK/llama-build.done" ] && break; sleep 1; done
  tail -3 "$WORK/llama-build.log"
  LLAMA="$WORK/llama.cpp/build/bin/llama-server"
  # 64 slots of 512 tokens: every stream of the 64-stream run has its own.
  "$LLAMA" -m "$WORK/moe-q8_0.gguf" --port $PORT -ngl 99 -c 32768 -np 64 --no-webui \
    > "$OUT/serve-moe-llama.log" 2>&1 &
  pid=$!
  wait_up $pid "$OUT/serve-moe-llama.log" && bench llama-q8_0 $pid "$OUT/serve-moe-llama.log"
fi
