//! GGUF files in the layouts Ollama's own converter wrote before it took llama.cpp's names,
//! read as llama.cpp's: the gpt-oss files of Ollama's library (architecture `gptoss`). The
//! differences are the ones Ollama's own loader undoes today (`handle_gptoss` in its
//! llama/compat/llama-ollama-compat.cpp), so that everything past the header reader sees one
//! layout.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::Shape;

/// Ollama's name of the gpt-oss architecture (and its metadata keys' prefix).
const OLLAMA_GPT_OSS: &str = "gptoss";
/// llama.cpp's.
const GPT_OSS: &str = "gpt-oss";
/// Tensor name parts Ollama's gpt-oss files spell otherwise: (Ollama's, llama.cpp's).
const GPT_OSS_TENSOR_NAMES: [(&str, &str); 2] =
    [(".attn_out.", ".attn_output."), (".ffn_norm.", ".post_attention_norm.")];

/// Rewrites a GGUF header's `metadata` and `tensors` (by name, each with its shape, outermost
/// dimension first, from `shape`) in llama.cpp's layout when they are one of Ollama's own
/// layouts; returns whether they were.
pub fn to_llama_cpp_layout<T>(
    metadata: &mut HashMap<String, Value>,
    tensors: &mut HashMap<String, T>,
    shape: impl Fn(&T) -> &Shape,
) -> bool {
    let arch = metadata.get("general.architecture");
    if !matches!(arch, Some(Value::String(a)) if a == OLLAMA_GPT_OSS) {
        return false;
    }
    *metadata = std::mem::take(metadata)
        .into_iter()
        .map(|(key, value)| match key.strip_prefix("gptoss.") {
            Some(rest) => (format!("{GPT_OSS}.{rest}"), value),
            None => (key, value),
        })
        .collect();
    metadata.insert("general.architecture".into(), Value::String(GPT_OSS.into()));
    // Its files name the generic pre-tokenizer; gpt-oss's is GPT-4o's.
    metadata.insert("tokenizer.ggml.pre".into(), Value::String("gpt-4o".into()));
    metadata
        .entry(format!("{GPT_OSS}.rope.scaling.type"))
        .or_insert_with(|| Value::String("yarn".into()));
    *tensors = std::mem::take(tensors)
        .into_iter()
        .map(|(name, info)| {
            let name = match name.strip_suffix(".attn_sinks") {
                Some(stem) => format!("{stem}.attn_sinks.weight"),
                None => GPT_OSS_TENSOR_NAMES
                    .iter()
                    .fold(name, |n, (ollama, llama_cpp)| n.replace(ollama, llama_cpp)),
            };
            (name, info)
        })
        .collect();
    // The experts' width, absent from its keys: the gate experts' rows ([experts, width, hidden]).
    let gate_width = tensors
        .get("blk.0.ffn_gate_exps.weight")
        .and_then(|t| match shape(t).dims() {
            &[_, width, _] => Some(width),
            _ => None,
        });
    if let (Entry::Vacant(slot), Some(width)) = (
        metadata.entry(format!("{GPT_OSS}.expert_feed_forward_length")),
        gate_width,
    ) {
        slot.insert(Value::U32(width as u32));
    }
    true
}
