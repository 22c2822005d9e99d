#!/usr/bin/env python3
"""gpt-oss in the layout of the GGUFs in Ollama's library (`ollama pull gpt-oss:20b`), made from
llama.cpp's copy of the same weights, for tests/gpt_oss_models.rs.

Ollama wrote its gpt-oss files with its own converter before it took llama.cpp's names: the
architecture is `gptoss` (keys `gptoss.*`), the output projection is `attn_out`, the sinks
`attn_sinks` without `.weight`, the pre-MLP norm `ffn_norm`; the keys
`expert_feed_forward_length` and `rope.scaling.type` are absent and the pre-tokenizer is
`default`. Ollama's own loader undoes exactly these differences today
(llama/compat/llama-ollama-compat.cpp, `handle_gptoss`); this script applies their inverse to
gguf/gpt_oss-mxfp4.gguf, every tensor's bytes copied unchanged, so the copy must follow the
same llama.cpp reference (refs/llamacpp-mxfp4.json).

    pip install gguf==0.19.0
    python tests/data/gpt_oss/make_ollama_gguf.py
"""
from pathlib import Path

import gguf

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "gguf" / "gpt_oss-mxfp4.gguf"
TARGET = HERE / "gguf" / "gpt_oss-mxfp4-ollama.gguf"
DROPPED_KEYS = {"gpt-oss.expert_feed_forward_length", "gpt-oss.rope.scaling.type"}
TENSOR_NAMES = [(".attn_output.", ".attn_out."), (".attn_sinks.weight", ".attn_sinks"),
                (".post_attention_norm.", ".ffn_norm.")]


def ollama_tensor_name(name):
    for llama_cpp, ollama in TENSOR_NAMES:
        name = name.replace(llama_cpp, ollama)
    return name


def main():
    reader = gguf.GGUFReader(SOURCE)
    writer = gguf.GGUFWriter(TARGET, arch="gptoss")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") \
                or field.name in DROPPED_KEYS:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = "default" if field.name == "tokenizer.ggml.pre" else field.contents()
        name = "gptoss." + field.name.removeprefix("gpt-oss.") if field.name.startswith("gpt-oss.") else field.name
        writer.add_key_value(name, value, kind, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(ollama_tensor_name(tensor.name), tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
