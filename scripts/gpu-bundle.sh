#!/usr/bin/env bash
# Packs what scripts/test-gpu.sh needs into .gpu/ (ignored by git) for a GPU machine that has
# this checkout but not ../shared: the cuda binary (xz-compressed), the fixtures it checks,
# the Qwen2.5 tokenizer and generator of the benchmark model, and the `gguf` wheel that
# benches/make_gguf.py needs. Stays under the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${MLXD_SHARED:-../shared}"
B=.gpu
rm -rf "$B" && mkdir -p "$B/shared/fixtures/gguf/refs" "$B/shared/tokenizers" "$B/shared/tools" "$B/whl"
xz -T2 -6 -c target/cuda/release/mlxd > "$B/mlxd.xz"
for arch in llama qwen2 qwen3 gemma3 mistral phi3 phi3-longrope; do
  src="$SHARED/fixtures/$arch"
  mkdir -p "$B/shared/fixtures/$arch/refs"
  cp -r "$src/f32" "$B/shared/fixtures/$arch/"
  [ -d "$src/mlx-q4" ] && cp -r "$src/mlx-q4" "$B/shared/fixtures/$arch/"
  for set in transformers-f32 transformers-bf16 mlx-q4-f32; do
    [ -f "$src/refs/$set.json" ] && cp "$src/refs/$set.json" "$B/shared/fixtures/$arch/refs/"
  done
done
for arch in llama qwen2 qwen3 gemma3 mistral phi3; do
  for kind in f32 q8_0 q4_0; do
    cp "$SHARED/fixtures/gguf/$arch-$kind.gguf" "$B/shared/fixtures/gguf/"
    cp "$SHARED/fixtures/gguf/refs/$arch-$kind.json" "$B/shared/fixtures/gguf/refs/"
  done
done
cp -r "$SHARED/tokenizers/qwen2.5" "$B/shared/tokenizers/"
xz -T2 "$B/shared/tokenizers/qwen2.5/tokenizer.json"
cp -r "$SHARED/tools/bench" "$B/shared/tools/"
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$B/whl" gguf==0.19.0
du -sh "$B"
