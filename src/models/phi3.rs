//! Phi-3 / Phi-3.5 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj`, partial rotary and
//! LongRoPE (both handled by the rope configuration).

use super::config::HfConfig;
use super::decoder::DecoderSpec;
use crate::formats::LoadError;

/// The decoder spec of a Phi-3 config.
pub fn spec(cfg: &HfConfig) -> Result<DecoderSpec, LoadError> {
    let base = DecoderSpec::base(cfg, false)?.with_uniform_sliding_window(cfg);
    let mlp = super::feed_forward::MlpSpec {
        fused_gate_up: true,
        ..base.mlp
    };
    Ok(DecoderSpec {
        fused_qkv: true,
        mlp,
        ..base
    })
}
