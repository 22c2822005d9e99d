#!/usr/bin/env bash
# mlxd vs llama-server on this CPU, same GGUF files, one server at a time, alternating rounds.
#
#   bash benches/vs_llama_cpp.sh [ROUNDS]        (WORK=/tmp/mlxd-vs-llama by default)
#
# Builds llama.cpp's llama-server from the pinned llama-cpp-python sdist (it vendors llama.cpp;
# ggml 0.25.3), makes a random-weight Qwen2.5-0.5B-shaped model with ../shared/tools/bench and
# its Q8_0 / Q4_0 / F16 GGUF files with benches/make_gguf.py, builds mlxd in release with
# -C target-cpu=native, then for each file and round serves it with each server (2 threads) and
# measures with `mlxd bench`: decode time per token at 1 stream, total tok/s at 8 streams,
# TTFT of a 512-token prompt, warm TTFT of 8 requests sharing a 1000-token prefix, peak RSS.
# The `mlx4` rows serve an MLX 4-bit copy (benches/make_mlx.py) with mlxd against llama.cpp's
# Q4_0 file; the `bf16` rows serve the Hugging Face bf16 folder itself with mlxd against
# llama.cpp's F16 file. Prints the medians and mlxd ÷ llama.
#
# Other files: PREFIX names existing PREFIX-<kind>.gguf files and KINDS the kinds to compare,
# e.g. the Qwen3-30B-A3B-shaped mixture of experts of benches/make_moe_gguf.py:
#   PREFIX=$WORK/moe8 KINDS="q8_0 q4_0" bash benches/vs_llama_cpp.sh 1
# or the Gemma 4 E2B-shaped model of benches/make_gemma4_gguf.py (and make_gemma4_mlx.py's
# PREFIX-mlx4 folder for the mlx4 row):
#   PREFIX=$WORK/g4e2b KINDS="q4_0 mlx4" bash benches/vs_llama_cpp.sh 1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
SHARED="${MLXD_SHARED:-$ROOT/../shared}"
WORK="${WORK:-/tmp/mlxd-vs-llama}"
ROUNDS="${1:-2}"
PREFIX="${PREFIX:-$WORK/q05}"
KINDS="${KINDS:-q8_0 q4_0 mlx4 f16 bf16}"
SDIST_URL="https://pypi.org/packages/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
mkdir -p "$WORK"

# Tools: a venv with cmake (pip), numpy and gguf.
[ -x "$WORK/venv/bin/python" ] || python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check cmake numpy gguf
export PATH="$WORK/venv/bin:$PATH"

# llama-server from the pinned sdist.
LLAMA="$WORK/llama.cpp/build/bin/llama-server"
if [ ! -x "$LLAMA" ]; then
  curl -sSL -o "$WORK/sdist.tar.gz" "$SDIST_URL"
  echo "$SDIST_SHA256  $WORK/sdist.tar.gz" | sha256sum -c -
  tar xzf "$WORK/sdist.tar.gz" -C "$WORK"
  rm -rf "$WORK/llama.cpp" && mv "$WORK"/llama_cpp_python-*/vendor/llama.cpp "$WORK/llama.cpp"
  # The instruction sets this CPU reports, as -march=native would pick them, but never AMX:
  # some of these VMs report AMX tiles that the kernel does not enable (a native build dies
  # with SIGILL there), and AVX-512 only where the CPU has it (the AMD EPYC machines do not).
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { case "$cpu_flags" in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
  cmake -S "$WORK/llama.cpp" -B "$WORK/llama.cpp/build" -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" \
    -DGGML_F16C="$(has f16c)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)" \
    -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
    -DGGML_AVX512_BF16="$(has avx512_bf16)" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$WORK/llama.cpp/build" --target llama-server llama-quantize -j2 >/dev/null
fi

# The model, its GGUF files and its MLX 4-bit folder (unless PREFIX names other files).
if [ "$PREFIX" != "$WORK/q05" ]; then
  :
elif [ ! -f "$WORK/q05-q8_0.gguf" ]; then
  python "$SHARED/tools/bench/make_random_qwen25.py" --tokenizer-dir "$SHARED/tokenizers/qwen2.5" --out "$WORK/q05"
  python benches/make_gguf.py "$WORK/q05" "$WORK/q05"
fi
if [ "$PREFIX" = "$WORK/q05" ] && [ ! -f "$WORK/q05-mlx4/model.safetensors" ]; then
  python benches/make_mlx.py "$WORK/q05" "$WORK/q05-mlx4" 4 64
fi

# mlxd, release, native.
RUSTFLAGS="-C target-cpu=native" cargo build --release --bin mlxd
MLXD="$ROOT/target/release/mlxd"
PORT=18777

model() { # $1 = server, $2 = kind: the file (or folder) that server serves
  if [ "$2" = mlx4 ]; then
    if [ "$1" = mlxd ]; then echo "$PREFIX-mlx4"; else echo "$PREFIX-q4_0.gguf"; fi
  elif [ "$2" = bf16 ]; then
    if [ "$1" = mlxd ]; then echo "$WORK/q05"; else echo "$WORK/q05-f16.gguf"; fi
  else
    echo "$PREFIX-$2.gguf"
  fi
}
start() { # $1 = server, $2 = model file or folder
  if [ "$1" = mlxd ]; then
    RAYON_NUM_THREADS=2 "$MLXD" serve --model "$2" --port $PORT --kv-memory 1GiB >"$WORK/server.log" 2>&1 &
  else
    LD_LIBRARY_PATH="$(dirname "$LLAMA")" "$LLAMA" -m "$2" --port $PORT -t 2 -tb 2 -c 8192 -np 8 --no-webui \
      >"$WORK/server.log" 2>&1 &
  fi
  PID=$!
  for _ in $(seq 1 600); do
    curl -sf "localhost:$PORT/health" >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "server $1 did not start" >&2; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }
quiet() { # wait (up to a minute) until the 1-minute load average is low
  for _ in $(seq 1 12); do
    awk '{exit !($1 < 1.0)}' /proc/loadavg && return
    sleep 5
  done
}
# A failed measurement leaves its cell empty (and says so) instead of ending the comparison.
bench() { "$MLXD" bench --url "http://127.0.0.1:$PORT" "$@" 2>>"$WORK/bench-errors.log" || echo "bench failed: $*" >&2; }
col() { # column $2 of the last data row of bench output $1
  echo "$1" | awk -v c="$2" '$1 ~ /^[0-9]+$/ {v=$c} END {print v}'
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
for kind in $KINDS; do
  for round in $(seq 1 "$ROUNDS"); do
    for server in mlxd llama; do
      quiet
      start "$server" "$(model "$server" "$kind")"
      one=$(bench --concurrency 1 --requests-per-client 2 --prompt-tokens 200 --output-tokens 64)
      eight=$(bench --concurrency 8 --requests-per-client 1 --prompt-tokens 200 --output-tokens 128)
      ttft=$(bench --concurrency 1 --requests-per-client 1 --prompt-tokens 512 --output-tokens 1)
      bench --concurrency 8 --requests-per-client 1 --prompt-tokens 1000 --output-tokens 16 --shared-prefix 0.99 >/dev/null
      warm=$(bench --concurrency 8 --requests-per-client 1 --prompt-tokens 1000 --output-tokens 16 --shared-prefix 0.99)
      rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status")
      stop
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$kind" "$server" "$round" \
        "$(col "$one" 6)" "$(col "$eight" 3)" "$(col "$ttft" 4)" "$(col "$warm" 4)" "$rss" | tee -a "$RESULTS"
    done
  done
done

python - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
metrics = [("decode ms/token, 1 stream (ITL p50)", 3, False), ("total tok/s, 8 streams", 4, True),
           ("TTFT ms, 512-token prompt", 5, False), ("warm TTFT ms, 8 x 1000-token shared prefix", 6, False),
           ("peak RSS MiB", 7, False)]
for kind in dict.fromkeys(r[0] for r in rows):
    print(f"\n{kind}")
    print(f"{'':44s} {'mlxd':>10s} {'llama':>10s} {'mlxd/llama':>11s}")
    for name, i, higher_better in metrics:
        vals = {s: [float(r[i]) for r in rows if r[0] == kind and r[1] == s and r[i]] for s in ("mlxd", "llama")}
        med = {s: statistics.median(v) if v else float("nan") for s, v in vals.items()}
        print(f"{name:44s} {med['mlxd']:10.1f} {med['llama']:10.1f} {med['mlxd'] / med['llama']:11.2f}")
PY
