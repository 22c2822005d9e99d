#!/usr/bin/env python3
"""The Gemma 3 vision fixture as llama.cpp runs it: the text model and its mmproj (the vision
tower and projector) converted by the pinned llama.cpp tree's convert_hf_to_gguf.py, as
`gguf/text-f32.gguf` and `gguf/mmproj-f32.gguf` (the converter keeps the input projection in
F16 and the patch and position embeddings in F32, as it does for the released models).

    # llama.cpp from the pinned tree benches/vs_llama_cpp.sh unpacks (no build needed);
    # a Python with torch and transformers (see make_fixtures.py).
    python tests/data/gemma3_vision/make_gguf.py --llama-cpp /work/bench/llama.cpp

transformers 5.25 saves the tower as `vision_tower.*`; the converter knows the Hub's
`vision_tower.vision_model.*` (as the released checkpoints name it), so a copy renamed that
way is converted. The fixture's small tokenizer has no pre-tokenizer llama.cpp knows by hash:
`default` is pinned, as tests/data/moe/make_gguf.py does.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent


def convert(llama_cpp, folder, outfile, mmproj):
    code = f"""
import sys
sys.path.insert(0, {str(llama_cpp)!r}); sys.path.insert(1, {str(llama_cpp / 'gguf-py')!r})
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def pinned(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return "default"
base.TextModel.get_vocab_base_pre = pinned
import convert_hf_to_gguf as conv
sys.argv = ["convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", {str(outfile)!r}, {str(folder)!r}]
if {mmproj!r}:
    sys.argv.insert(1, "--mmproj")
conv.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True, help="the pinned llama.cpp tree")
    a = ap.parse_args()
    out = HERE / "gguf"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        shutil.copytree(HERE / "f32", hub)
        weights = load_file(hub / "model.safetensors")
        renamed = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
                   for k, v in weights.items()}
        save_file(renamed, hub / "model.safetensors", metadata={"format": "pt"})
        convert(a.llama_cpp, hub, out / "text-f32.gguf", mmproj=False)
        convert(a.llama_cpp, hub, out / "mmproj-f32.gguf", mmproj=True)
    print("wrote", *sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
