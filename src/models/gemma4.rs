//! Gemma 4 text (`Gemma4ForCausalLM`, and the language model inside
//! `Gemma4ForConditionalGeneration`, whose vision and audio towers are not loaded). Unlike
//! Gemma 3: RMSNorm scales by `w` (not `1 + w`), scores are not scaled (q/k norms instead), a
//! norm without scale on v, global layers with their own head_dim and KV heads (values equal
//! to keys with `attention_k_eq_v`) and a proportional rope that turns only part of each head;
//! per-layer input embeddings (E2B/E4B), the last layers reading the KV of the last earlier
//! layer of their type, with double-wide MLPs, a scalar on each layer's output, and the
//! 26B-A4B's experts beside the dense MLP. Reference: transformers 5.25's `modeling_gemma4.py`.

use super::config::{HfConfig, LayerType, RopeConfig, RopeScaling};
use super::decoder::{DecoderSpec, NormPlacement, PerLayerInputSpec};
use super::feed_forward::{MlpSpec, MoeLayout, MoeSpec};
use super::gemma3::language_model_prefix;
use super::llama::{moe_key, routing};
use crate::compute::attention::HeadDims;
use crate::formats::source::WeightSource;
use crate::formats::LoadError;

/// transformers' defaults where a config leaves them out.
const DEFAULT_GLOBAL_HEAD_DIM: usize = 512;
const DEFAULT_PER_LAYER_VOCAB: usize = 262_144;

/// The decoder spec of a Gemma 4 config; `vb` tells which tensor prefix the file uses.
pub fn spec(cfg: &HfConfig, vb: &WeightSource) -> Result<DecoderSpec, LoadError> {
    if cfg.use_bidirectional_attention.as_deref() == Some("all") {
        return Err(LoadError::Unsupported(
            "Gemma 4 with `use_bidirectional_attention: all` (an encoder, not a chat model)".into(),
        ));
    }
    let base = DecoderSpec::base(cfg, true)?;
    let prefix = language_model_prefix(vb, "Gemma 4")?;
    if cfg.architectures.first().map(String::as_str) == Some("Gemma4ForConditionalGeneration") {
        tracing::info!("Gemma 4: serving its language model; the vision and audio towers are not loaded");
    }
    let layer_types = cfg.layer_types()?;
    let global_dims = global_dims(cfg, &layer_types)?;
    let kv_source = kv_sources(&layer_types, cfg.num_kv_shared_layers)?;
    let per_layer_input = cfg
        .hidden_size_per_layer_input
        .filter(|&w| w > 0)
        .map(|width| PerLayerInputSpec {
            width,
            vocab: cfg.vocab_size_per_layer_input.unwrap_or(DEFAULT_PER_LAYER_VOCAB),
        });
    let moe = cfg.enable_moe_block.then(|| experts(cfg, &base.mlp)).transpose()?;
    Ok(DecoderSpec {
        norm_placement: NormPlacement::Sandwich,
        qk_norm: true,
        v_norm: true,
        embed_scale: Some((cfg.hidden_size as f64).sqrt()),
        attn_scale: 1.0,
        rope_full: rope(cfg, LayerType::Full, global_dims.head_dim)?,
        rope_sliding: Some(rope(cfg, LayerType::Sliding, base.dims.head_dim)?),
        sliding_window: cfg.sliding_window,
        global_dims: Some(global_dims),
        global_values_are_keys: cfg.attention_k_eq_v,
        kv_source,
        double_wide_shared_mlp: cfg.use_double_wide_mlp,
        layer_scalar: true,
        per_layer_input,
        layer_types,
        moe,
        prefix,
        ..base
    })
}

/// The head layout of the global (full-attention) layers: `per_layer_config` as transformers
/// 5.25 saves it, else `global_head_dim` and, where values are keys,
/// `num_global_key_value_heads`, as the Hub's configs spell them. All global layers share one.
fn global_dims(cfg: &HfConfig, layer_types: &[LayerType]) -> Result<HeadDims, LoadError> {
    let fallback_kv_heads = match cfg.num_global_key_value_heads {
        Some(n) if cfg.attention_k_eq_v => n,
        _ => cfg.num_kv_heads(),
    };
    let mut found: Option<HeadDims> = None;
    for (i, &kind) in layer_types.iter().enumerate() {
        let entry = cfg.per_layer_config.get(&i.to_string());
        if kind == LayerType::Sliding {
            if entry.is_some() {
                return Err(LoadError::Unsupported(format!(
                    "`per_layer_config` for sliding layer {i} (Gemma 4 gives only global layers their own heads)"
                )));
            }
            continue;
        }
        let dims = HeadDims {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: entry.and_then(|e| e.num_key_value_heads).unwrap_or(fallback_kv_heads),
            head_dim: entry
                .and_then(|e| e.head_dim)
                .or(cfg.global_head_dim)
                .unwrap_or(DEFAULT_GLOBAL_HEAD_DIM),
        };
        if dims.num_kv_heads == 0 || !dims.num_heads.is_multiple_of(dims.num_kv_heads) {
            return Err(LoadError::Malformed {
                file: "config.json".into(),
                reason: format!(
                    "layer {i}: {} KV heads for {} query heads",
                    dims.num_kv_heads, dims.num_heads
                ),
            });
        }
        match found {
            Some(prev) if prev != dims => {
                return Err(LoadError::Unsupported(format!(
                    "`per_layer_config`: global layers with different head layouts ({prev:?} and {dims:?} at layer {i})"
                )))
            }
            _ => found = Some(dims),
        }
    }
    Ok(found.unwrap_or(HeadDims {
        num_heads: cfg.num_attention_heads,
        num_kv_heads: fallback_kv_heads,
        head_dim: cfg.global_head_dim.unwrap_or(DEFAULT_GLOBAL_HEAD_DIM),
    }))
}

/// Per layer, the layer whose KV it reads: the last `shared` layers read the KV of the last
/// layer of their type before them (transformers' `kv_sharing_modes`).
fn kv_sources(layer_types: &[LayerType], shared: usize) -> Result<Vec<Option<usize>>, LoadError> {
    let n = layer_types.len();
    if shared == 0 {
        return Ok(vec![None; n]);
    }
    if shared >= n {
        return Err(LoadError::Unsupported(format!(
            "num_kv_shared_layers {shared} of {n} layers: no layer keeps KV"
        )));
    }
    let first_shared = n - shared;
    (0..n)
        .map(|i| {
            if i < first_shared {
                return Ok(None);
            }
            (0..first_shared)
                .rev()
                .find(|&j| layer_types[j] == layer_types[i])
                .map(Some)
                .ok_or_else(|| LoadError::Malformed {
                    file: "config.json".into(),
                    reason: format!("num_kv_shared_layers: layer {i} has no earlier layer of its type to read KV from"),
                })
        })
        .collect()
}

/// The rope of a layer type for heads `head_dim` wide; without `rope_parameters`,
/// transformers' defaults (sliding: θ 10⁴; global: proportional, θ 10⁶, a quarter turning).
fn rope(cfg: &HfConfig, kind: LayerType, head_dim: usize) -> Result<RopeConfig, LoadError> {
    if cfg.has_rope_parameters() {
        return cfg.rope_for_head(kind, head_dim);
    }
    Ok(match kind {
        LayerType::Sliding => RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
            rotary_dim: head_dim,
        },
        LayerType::Full => RopeConfig {
            theta: 1_000_000.0,
            scaling: RopeScaling::Proportional {
                rotated: head_dim / 8,
                factor: 1.0,
            },
            rotary_dim: head_dim,
        },
    })
}

/// The 26B-A4B's experts: `num_experts` of `moe_intermediate_size`, `top_k_experts` per token,
/// renormalized, beside the dense MLP of every layer.
fn experts(cfg: &HfConfig, mlp: &MlpSpec) -> Result<MoeSpec, LoadError> {
    let num_experts = moe_key(cfg.num_experts, "num_experts")?;
    Ok(MoeSpec {
        num_experts,
        routing: routing((cfg.top_k_experts, "top_k_experts"), num_experts, true)?,
        expert: MlpSpec {
            intermediate: moe_key(cfg.moe_intermediate_size, "moe_intermediate_size")?,
            bias: false,
            fused_gate_up: true,
            ..*mlp
        },
        layout: MoeLayout::BesideDense,
        sparse_layers: vec![true; cfg.num_hidden_layers],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> HfConfig {
        let mut json = serde_json::json!({
            "architectures": ["Gemma4ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 512,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        });
        json.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        HfConfig::parse(&json.to_string(), "config.json").expect("config")
    }

    #[test]
    fn global_heads_come_from_either_spelling() {
        let dims = |extra| {
            let cfg = config(extra);
            global_dims(&cfg, &cfg.layer_types().expect("types")).map(|d| (d.num_kv_heads, d.head_dim))
        };
        // The Hub's keys: the KV-head override applies only where values are keys.
        let hub = serde_json::json!({"global_head_dim": 32, "num_global_key_value_heads": 1});
        assert_eq!(dims(hub.clone()).expect("hub"), (2, 32));
        let mut k_eq_v = hub;
        k_eq_v["attention_k_eq_v"] = true.into();
        assert_eq!(dims(k_eq_v).expect("k_eq_v"), (1, 32));
        // transformers 5.25's `per_layer_config`.
        let saved = serde_json::json!({"per_layer_config": {
            "1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32, "num_key_value_heads": 1}}});
        assert_eq!(dims(saved).expect("saved"), (1, 32));
        // transformers' default width, and overrides that disagree or touch a sliding layer.
        assert_eq!(dims(serde_json::json!({})).expect("default"), (2, 512));
        let uneven = serde_json::json!({"per_layer_config": {"1": {"head_dim": 32}, "3": {"head_dim": 64}}});
        assert!(dims(uneven).is_err());
        assert!(dims(serde_json::json!({"per_layer_config": {"0": {"head_dim": 32}}})).is_err());
    }

    #[test]
    fn the_last_layers_read_the_last_earlier_layer_of_their_type() {
        use LayerType::{Full as F, Sliding as S};
        let types = [S, S, F, S, S, F, S, F];
        let sources = kv_sources(&types, 3).expect("valid");
        assert_eq!(sources, vec![None, None, None, None, None, Some(2), Some(4), Some(2)]);
        assert_eq!(kv_sources(&types, 0).expect("none shared"), vec![None; 8]);
        assert!(kv_sources(&types, 8).is_err());
        // A shared full layer with no full layer before the shared ones.
        assert!(kv_sources(&[S, S, F], 1).is_err());
    }
}
