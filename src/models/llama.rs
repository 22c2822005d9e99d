//! Llama-shaped families: Llama 2/3.x (incl. `llama3` rope scaling), TinyLlama, Mistral,
//! Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

use super::config::HfConfig;
use super::decoder::DecoderSpec;
use crate::formats::LoadError;

/// The decoder spec of a Llama-shaped `model_type`.
pub fn spec(cfg: &HfConfig, model_type: &str) -> Result<DecoderSpec, LoadError> {
    let base = DecoderSpec::base(cfg, false)?;
    Ok(match model_type {
        // Mistral v0.1 attends through a sliding window; later versions set it to null.
        "mistral" => base.with_uniform_sliding_window(cfg),
        "qwen2" => DecoderSpec {
            qkv_bias: true,
            o_bias: false,
            ..sliding_if_enabled(base, cfg)
        },
        "qwen3" => DecoderSpec {
            qk_norm: true,
            ..sliding_if_enabled(base, cfg)
        },
        _ => base,
    })
}

/// Qwen configs carry a `sliding_window` that only applies with `use_sliding_window`.
fn sliding_if_enabled(base: DecoderSpec, cfg: &HfConfig) -> DecoderSpec {
    if cfg.use_sliding_window == Some(true) {
        base.with_uniform_sliding_window(cfg)
    } else {
        base
    }
}
