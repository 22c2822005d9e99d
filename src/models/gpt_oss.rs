//! OpenAI's gpt-oss (`gpt_oss`): a Llama-shaped decoder with biased q/k/v/o, a learned
//! attention sink per head, sliding-window and full layers alternating, YaRN, and a mixture
//! of experts in every layer (biased router, top-k then softmax over the kept logits, experts
//! with biases and a clamped SwiGLU). Read from transformers 5.25's `modeling_gpt_oss.py`.

use super::config::{HfConfig, LayerType};
use super::decoder::DecoderSpec;
use super::feed_forward::{MlpSpec, MoeLayout, MoeSpec};
use super::llama::{moe_key, routing};
use crate::compute::layers::Activation;
use crate::formats::LoadError;

/// The decoder spec of a gpt-oss config.
pub fn spec(cfg: &HfConfig) -> Result<DecoderSpec, LoadError> {
    let base = DecoderSpec::base(cfg, false)?;
    let num_experts = moe_key(cfg.num_local_experts, "num_local_experts")?;
    // transformers' default when config.json lists no layer types: even layers slide.
    let layer_types = match cfg.layer_types {
        Some(_) => cfg.layer_types()?,
        None => (0..cfg.num_hidden_layers)
            .map(|i| {
                if i % 2 == 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect(),
    };
    if layer_types.contains(&LayerType::Sliding) && cfg.sliding_window.is_none() {
        return Err(LoadError::Unsupported(
            "a gpt-oss config with sliding layers but no `sliding_window`".into(),
        ));
    }
    let expert = MlpSpec {
        bias: true,
        activation: Activation::ClampedSwiglu {
            alpha: cfg.swiglu_alpha.unwrap_or(1.702),
            limit: cfg.swiglu_limit.unwrap_or(7.0),
        },
        ..base.mlp
    };
    Ok(DecoderSpec {
        attn_sinks: true,
        layer_types,
        sliding_window: cfg.sliding_window,
        moe: Some(MoeSpec {
            num_experts,
            // The softmax of the kept logits is the renormalized softmax of all of them.
            routing: routing((cfg.num_experts_per_tok, "num_experts_per_tok"), num_experts, true)?,
            expert,
            layout: MoeLayout::Interleaved,
            sparse_layers: vec![true; cfg.num_hidden_layers],
        }),
        ..base
    })
}
