//! Gemma 3 text (`Gemma3ForCausalLM`, and the language model inside
//! `Gemma3ForConditionalGeneration`): (1 + w) RMSNorm, four norms per layer, √hidden
//! embedding scale, `query_pre_attn_scalar`, q/k norms, interleaved sliding-window and global
//! layers with their own rope bases, GELU (tanh), optional soft-capping.

use super::config::{HfConfig, LayerType};
use super::decoder::{DecoderSpec, NormPlacement};
use crate::formats::source::WeightSource;
use crate::formats::LoadError;

/// Where the decoder's tensors live in the checkpoints that exist in the wild.
const PREFIXES: [&str; 3] = ["model", "model.language_model", "language_model.model"];

/// The decoder spec of a Gemma 3 config; `vb` tells which tensor prefix the file uses.
pub fn spec(cfg: &HfConfig, vb: &WeightSource) -> Result<DecoderSpec, LoadError> {
    if cfg.use_bidirectional_attention.as_deref() == Some("all") {
        return Err(LoadError::Unsupported(
            "Gemma 3 with `use_bidirectional_attention: true` (an encoder such as EmbeddingGemma, not a chat model)"
                .into(),
        ));
    }
    let base = DecoderSpec::base(cfg, true)?;
    let prefix = language_model_prefix(vb, "Gemma 3")?;
    let query_scalar = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim() as f64);
    Ok(DecoderSpec {
        norm_unit_offset: true,
        norm_placement: NormPlacement::Sandwich,
        qk_norm: true,
        embed_scale: Some((cfg.hidden_size as f64).sqrt()),
        attn_scale: query_scalar.powf(-0.5),
        layer_types: cfg.layer_types()?,
        rope_sliding: Some(cfg.rope(LayerType::Sliding)?),
        sliding_window: cfg.sliding_window,
        prefix,
        ..base
    })
}

/// The tensor prefix of the language model in a Gemma checkpoint (`family` names it in the
/// error when no embedding is found under any).
pub(super) fn language_model_prefix(vb: &WeightSource, family: &str) -> Result<String, LoadError> {
    PREFIXES
        .iter()
        .find(|p| vb.contains_tensor(&format!("{p}.embed_tokens.weight")))
        .map(|p| p.to_string())
        .ok_or_else(|| LoadError::Malformed {
            file: "model weights".into(),
            reason: format!("no {family} embedding under any of {PREFIXES:?}"),
        })
}
