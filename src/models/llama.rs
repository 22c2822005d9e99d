//! Llama-shaped families: Llama 2/3.x (incl. `llama3` rope scaling), TinyLlama, Mistral,
//! Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), and their mixture-of-experts kin:
//! Qwen3-MoE (Qwen3 with sparse layers) and Mixtral (Mistral with sparse layers).

use super::config::HfConfig;
use super::decoder::DecoderSpec;
use super::feed_forward::{MlpNames, MlpSpec, MoeLayout, MoeSpec};
use crate::compute::experts::Routing;
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
        "qwen3_moe" => DecoderSpec {
            qk_norm: true,
            moe: Some(qwen_moe(cfg, &base.mlp)?),
            ..sliding_if_enabled(base, cfg)
        },
        "mixtral" => DecoderSpec {
            moe: Some(mixtral_moe(cfg, &base.mlp)?),
            ..base.with_uniform_sliding_window(cfg)
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

/// A required MoE key of config.json.
pub(super) fn moe_key(value: Option<usize>, key: &str) -> Result<usize, LoadError> {
    value
        .filter(|&v| v > 0)
        .ok_or_else(|| LoadError::Unsupported(format!("a mixture-of-experts config without `{key}`")))
}

/// Qwen-MoE's sparse layers: every `decoder_sparse_step`-th layer not in `mlp_only_layers`,
/// each with `num_experts` experts of `moe_intermediate_size`.
fn qwen_moe(cfg: &HfConfig, mlp: &MlpSpec) -> Result<MoeSpec, LoadError> {
    let num_experts = moe_key(cfg.num_experts, "num_experts")?;
    let step = cfg.decoder_sparse_step.unwrap_or(1).max(1);
    Ok(MoeSpec {
        num_experts,
        routing: routing(
            (cfg.num_experts_per_tok, "num_experts_per_tok"),
            num_experts,
            cfg.norm_topk_prob.unwrap_or(false),
        )?,
        expert: MlpSpec {
            intermediate: moe_key(cfg.moe_intermediate_size, "moe_intermediate_size")?,
            bias: false,
            ..*mlp
        },
        layout: MoeLayout::Replacing { block: "mlp" },
        sparse_layers: (0..cfg.num_hidden_layers)
            .map(|i| !cfg.mlp_only_layers.contains(&i) && (i + 1) % step == 0)
            .collect(),
    })
}

/// Mixtral: every layer sparse (`block_sparse_moe`), experts `w1`/`w3`/`w2` of
/// `intermediate_size`, the kept probabilities renormalized.
fn mixtral_moe(cfg: &HfConfig, mlp: &MlpSpec) -> Result<MoeSpec, LoadError> {
    let num_experts = moe_key(cfg.num_local_experts, "num_local_experts")?;
    Ok(MoeSpec {
        num_experts,
        routing: routing((cfg.num_experts_per_tok, "num_experts_per_tok"), num_experts, true)?,
        expert: MlpSpec {
            bias: false,
            names: MlpNames::MIXTRAL,
            ..*mlp
        },
        layout: MoeLayout::Replacing {
            block: "block_sparse_moe",
        },
        sparse_layers: vec![true; cfg.num_hidden_layers],
    })
}

/// The top-k routing of config.json's experts-per-token `key` (its value given).
pub(super) fn routing(
    (top_k, key): (Option<usize>, &str),
    num_experts: usize,
    normalize: bool,
) -> Result<Routing, LoadError> {
    let top_k = moe_key(top_k, key)?;
    if top_k > num_experts {
        return Err(LoadError::Unsupported(format!(
            "{key} {top_k} is more than the {num_experts} experts"
        )));
    }
    Ok(Routing { top_k, normalize })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_moe_layers_are_sparse_by_step_except_the_dense_ones() {
        let text = r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
            "num_attention_heads": 4, "vocab_size": 512, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2,
            "mlp_only_layers": [3]}"#;
        let cfg = HfConfig::parse(text, "config.json").expect("config");
        let moe = spec(&cfg, "qwen3_moe").expect("spec").moe.expect("moe");
        assert_eq!(moe.sparse_layers, [false, true, false, false, false, true]);
        assert_eq!(
            moe.routing,
            Routing {
                top_k: 2,
                normalize: false
            }
        );
        assert_eq!(moe.expert.intermediate, 32);
    }
}
