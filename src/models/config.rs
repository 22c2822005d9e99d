//! `config.json` of a Hugging Face model folder: the fields every supported decoder family
//! reads (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3), classic and transformers-5 spellings.

use serde::Deserialize;
use serde_json::Value;

use crate::compute::layers::RopeTables;
use crate::formats::LoadError;

/// Rotary embedding of one attention layer type.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base θ of the frequencies.
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Leading dimensions of each head that are rotated (the rest pass through).
    pub rotary_dim: usize,
}

/// Supported `rope_scaling` / `rope_parameters` types.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (all frequencies scaled).
    Linear {
        /// Scale factor.
        factor: f32,
    },
    /// Llama 3.1's smooth per-wavelength scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f32,
        /// Wavelength threshold (as a fraction of the original context) for low frequencies.
        low_freq_factor: f32,
        /// Wavelength threshold for high frequencies.
        high_freq_factor: f32,
        /// Context length the model was pretrained at.
        original_max_position_embeddings: f32,
    },
    /// Per-frequency divisors (llama.cpp's `rope_freqs` tensor, e.g. Llama 3 scaling).
    Divisors(Vec<f32>),
    /// Gemma 4's global layers: the whole head is one rotation of `rotary_dim / 2` pairs
    /// (dimension `i` with `i + rotary_dim / 2`), of which only the first `rotated` turn, at
    /// the frequencies of a full-width rope divided by `factor`; the other pairs stand still.
    Proportional {
        /// Pairs that turn (`partial_rotary_factor · head_dim / 2`).
        rotated: usize,
        /// Frequency divisor.
        factor: f32,
    },
    /// YaRN (gpt-oss, DeepSeek): each frequency blends its interpolated (`/ factor`) and
    /// original value along a linear ramp between the dimensions that turn `beta_fast` and
    /// `beta_slow` times over the original context; cos and sin scaled by `attention_factor`.
    Yarn {
        /// Context extension factor.
        factor: f32,
        /// Rotations over the original context above which a frequency is kept as is.
        beta_fast: f32,
        /// Rotations below which a frequency is fully interpolated.
        beta_slow: f32,
        /// Context length the model was pretrained at.
        original_max_position_embeddings: f32,
        /// Round the ramp's ends outwards to whole dimensions (transformers' default).
        truncate: bool,
        /// Multiplier of cos and sin.
        attention_factor: f32,
    },
    /// Phi-3 LongRoPE: per-frequency divisors, short below the original context and long
    /// beyond it, and cos/sin scaled by an attention factor.
    LongRope {
        /// Divisors used for positions below `original_max_position_embeddings`.
        short_factor: Vec<f32>,
        /// Divisors used from `original_max_position_embeddings` on.
        long_factor: Vec<f32>,
        /// Context length the model was pretrained at.
        original_max_position_embeddings: usize,
        /// Multiplier of cos and sin.
        attention_factor: f32,
    },
}

impl RopeConfig {
    /// `inv_freq[i] = 1 / (divisor_i · θ^(2i/d))` for `d = rotary_dim`, in f32 as transformers.
    fn inv_freq(&self, divisors: Option<&[f32]>) -> Vec<f32> {
        let d = self.rotary_dim;
        if let RopeScaling::Yarn { .. } = self.scaling {
            return self.yarn_inv_freq();
        }
        (0..d / 2)
            .map(|i| {
                let base = self.theta.powf((2 * i) as f32 / d as f32);
                1.0 / (divisors.map_or(1.0, |f| f[i]) * base)
            })
            .enumerate()
            .map(|(i, f)| self.scale_frequency(i, f))
            .collect()
    }

    /// Frequency `i` (of value `f` before scaling) as the scaling has it.
    fn scale_frequency(&self, i: usize, f: f32) -> f32 {
        match self.scaling {
            RopeScaling::None | RopeScaling::LongRope { .. } | RopeScaling::Divisors(_) | RopeScaling::Yarn { .. } => f,
            RopeScaling::Linear { factor } => f / factor,
            RopeScaling::Proportional { rotated, factor } => {
                if i < rotated {
                    f / factor
                } else {
                    0.0
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < old_len / high_freq_factor {
                    f
                } else if wavelen > old_len / low_freq_factor {
                    f / factor
                } else {
                    let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            }
        }
    }

    /// YaRN's frequencies, as transformers' `_compute_yarn_parameters`.
    fn yarn_inv_freq(&self) -> Vec<f32> {
        let RopeScaling::Yarn {
            factor,
            beta_fast,
            beta_slow,
            original_max_position_embeddings: original,
            truncate,
            ..
        } = self.scaling
        else {
            unreachable!("yarn_inv_freq is called for YaRN only")
        };
        let d = self.rotary_dim;
        let (dim, base) = (d as f64, f64::from(self.theta));
        // The dimension that turns `rotations` times over the original context.
        let correction = |rotations: f32| {
            dim * (f64::from(original) / (f64::from(rotations) * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
        if low == high {
            high += 0.001;
        }
        (0..d / 2)
            .map(|i| {
                let base_freq = self.theta.powf((2 * i) as f32 / d as f32);
                let (extrapolated, interpolated) = (1.0 / base_freq, 1.0 / (factor * base_freq));
                let extrapolation = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
            })
            .collect()
    }

    /// The tables for positions `0..max_positions` (angles rounded once in f32).
    pub fn tables(&self, max_positions: usize) -> RopeTables {
        let (short, long, switch_at, factor) = match &self.scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => (
                self.inv_freq(Some(short_factor)),
                self.inv_freq(Some(long_factor)),
                *original_max_position_embeddings,
                *attention_factor,
            ),
            RopeScaling::Divisors(divisors) => {
                let f = self.inv_freq(Some(divisors));
                (f.clone(), f, usize::MAX, 1.0)
            }
            RopeScaling::Yarn { attention_factor, .. } => {
                let f = self.inv_freq(None);
                (f.clone(), f, usize::MAX, *attention_factor)
            }
            _ => {
                let f = self.inv_freq(None);
                (f.clone(), f, usize::MAX, 1.0)
            }
        };
        let half_dim = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half_dim);
        let mut sin = Vec::with_capacity(max_positions * half_dim);
        for pos in 0..max_positions {
            let freqs = if pos < switch_at { &short } else { &long };
            for &f in freqs {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * factor);
                sin.push(angle.sin() * factor);
            }
        }
        RopeTables { cos, sin, half_dim }
    }
}

/// Raw `rope_scaling` (classic) or `rope_parameters` (transformers 5) object.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
    short_factor: Option<Vec<f32>>,
    long_factor: Option<Vec<f32>>,
    attention_factor: Option<f32>,
    partial_rotary_factor: Option<f32>,
    beta_fast: Option<f32>,
    beta_slow: Option<f32>,
    truncate: Option<bool>,
    mscale: Option<f32>,
    mscale_all_dim: Option<f32>,
}

/// The fields of a decoder-only `config.json` (unknown keys ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// e.g. `llama`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (defaults to query heads).
    pub num_key_value_heads: Option<usize>,
    /// Head dimension (defaults to hidden / heads).
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: usize,
    /// Pretraining context (Phi-3 LongRoPE).
    pub original_max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE θ (classic key).
    pub rope_theta: Option<f32>,
    /// RoPE θ of sliding-window layers (Gemma 3).
    pub rope_local_base_freq: Option<f32>,
    /// Share of each head that is rotated (Phi-3.5/4).
    pub partial_rotary_factor: Option<f32>,
    #[serde(default)]
    rope_scaling: Option<RawRope>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    /// lm_head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// q/k/v/o carry biases (Llama family key).
    #[serde(default)]
    pub attention_bias: bool,
    /// MLP projections carry biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation (`silu`, `gelu_pytorch_tanh`).
    pub hidden_act: Option<String>,
    /// Activation, Gemma's key.
    pub hidden_activation: Option<String>,
    /// Per-layer attention type (`sliding_attention` / `full_attention`).
    pub layer_types: Option<Vec<String>>,
    /// Sliding window size in tokens.
    pub sliding_window: Option<usize>,
    /// Every n-th layer is global (older Gemma 3 configs).
    pub sliding_window_pattern: Option<usize>,
    /// Qwen2's switch for its (unused) sliding window.
    pub use_sliding_window: Option<bool>,
    /// Gemma 3: attention scale is `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// tanh soft-capping of attention scores.
    pub attn_logit_softcapping: Option<f64>,
    /// tanh soft-capping of the final logits.
    pub final_logit_softcapping: Option<f64>,
    /// EOS id(s) as in config.json (an int or a list).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Experts per sparse layer (Qwen-MoE's name).
    pub num_experts: Option<usize>,
    /// Experts per sparse layer (Mixtral's name).
    pub num_local_experts: Option<usize>,
    /// Experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Inner width of each expert (Qwen-MoE; Mixtral's experts use `intermediate_size`).
    pub moe_intermediate_size: Option<usize>,
    /// Renormalize the kept experts' probabilities (Qwen-MoE).
    pub norm_topk_prob: Option<bool>,
    /// Every n-th layer is sparse (Qwen-MoE).
    pub decoder_sparse_step: Option<usize>,
    /// Layers that keep the dense MLP (Qwen-MoE).
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Sigmoid gain of gpt-oss's clamped SwiGLU.
    pub swiglu_alpha: Option<f32>,
    /// Clamp of gpt-oss's SwiGLU inputs.
    pub swiglu_limit: Option<f32>,
    /// Experts each token is routed to (Gemma 4's name).
    pub top_k_experts: Option<usize>,
    /// A routed mixture of experts beside every layer's dense MLP (Gemma 4).
    #[serde(default)]
    pub enable_moe_block: bool,
    /// Head dimension of full-attention layers (Gemma 4, as the Hub's configs spell it).
    pub global_head_dim: Option<usize>,
    /// KV heads of full-attention layers whose values are their keys (Gemma 4).
    pub num_global_key_value_heads: Option<usize>,
    /// Full-attention layers have no `v_proj`: their values are their keys (Gemma 4).
    #[serde(default)]
    pub attention_k_eq_v: bool,
    /// The last this many layers read the KV of the last earlier layer of their type (Gemma 4).
    #[serde(default)]
    pub num_kv_shared_layers: usize,
    /// Layers that read shared KV have MLPs twice as wide (Gemma 4).
    #[serde(default)]
    pub use_double_wide_mlp: bool,
    /// Width of each layer's slice of the per-layer input embeddings; 0 or absent: none
    /// (Gemma 4).
    pub hidden_size_per_layer_input: Option<usize>,
    /// Rows of the per-layer input embedding table (Gemma 4).
    pub vocab_size_per_layer_input: Option<usize>,
    /// `all` makes Gemma 4 an encoder; `vision` concerns image tokens only. Gemma 3 configs
    /// write a boolean (transformers 5.25 saves `false`): `true` reads as `all`.
    #[serde(default, deserialize_with = "bidirectional_attention")]
    pub use_bidirectional_attention: Option<String>,
    /// Per-layer overrides of `head_dim` / `num_key_value_heads`, keyed by layer index, as
    /// transformers 5.25 saves Gemma 4 configs.
    #[serde(default)]
    pub per_layer_config: std::collections::BTreeMap<String, LayerOverride>,
}

/// One layer's entry of `per_layer_config`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LayerOverride {
    /// The layer's head dimension.
    pub head_dim: Option<usize>,
    /// The layer's KV heads.
    pub num_key_value_heads: Option<usize>,
}

fn default_max_position() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// The attention type of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// Attends to every earlier position.
    Full,
    /// Attends to the last `sliding_window` positions.
    Sliding,
}

impl HfConfig {
    /// Parses `config.json` text; `file` names it in errors. A multimodal Gemma 3 config is
    /// read through its `text_config`.
    pub fn parse(text: &str, file: &str) -> Result<Self, LoadError> {
        let malformed = |e: serde_json::Error| LoadError::Malformed {
            file: file.to_string(),
            reason: e.to_string(),
        };
        let mut json: Value = serde_json::from_str(text).map_err(malformed)?;
        if let Some(mut text_cfg) = json.get("text_config").cloned().filter(Value::is_object) {
            for key in ["architectures", "eos_token_id", "tie_word_embeddings"] {
                if text_cfg.get(key).is_none() {
                    if let Some(v) = json.get(key) {
                        text_cfg[key] = v.clone();
                    }
                }
            }
            json = text_cfg;
        }
        serde_json::from_value(json).map_err(malformed)
    }

    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The activation name, from either spelling (`silu` when absent).
    pub fn activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or("silu")
    }

    /// Attention type of every layer: `layer_types`, else Gemma's `sliding_window_pattern`,
    /// else all full.
    pub fn layer_types(&self) -> Result<Vec<LayerType>, LoadError> {
        if let Some(types) = &self.layer_types {
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "sliding_attention" => Ok(LayerType::Sliding),
                    other => Err(LoadError::Unsupported(format!(
                        "layer type `{other}` (supported: full_attention, sliding_attention)"
                    ))),
                })
                .collect();
        }
        let pattern = self.sliding_window_pattern.unwrap_or(0);
        Ok((0..self.num_hidden_layers)
            .map(|i| {
                if pattern > 0 && (i + 1) % pattern != 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect())
    }

    /// config.json has a `rope_parameters` object (transformers 5).
    pub fn has_rope_parameters(&self) -> bool {
        self.rope_parameters.is_some()
    }

    /// The rope object for a layer type: transformers 5 may key `rope_parameters` by type.
    fn raw_rope(&self, layer: LayerType) -> Option<RawRope> {
        if let Some(params) = &self.rope_parameters {
            let key = match layer {
                LayerType::Full => "full_attention",
                LayerType::Sliding => "sliding_attention",
            };
            let chosen = params.get(key).unwrap_or(params);
            return serde_json::from_value(chosen.clone()).ok();
        }
        self.rope_scaling.clone()
    }

    /// Rotary configuration of a layer type. Gemma 3's sliding layers use
    /// `rope_local_base_freq` without scaling (classic keys).
    pub fn rope(&self, layer: LayerType) -> Result<RopeConfig, LoadError> {
        self.rope_for_head(layer, self.head_dim())
    }

    /// Rotary configuration of a layer type whose heads are `head_dim` wide (Gemma 4's global
    /// layers have their own).
    pub fn rope_for_head(&self, layer: LayerType, head_dim: usize) -> Result<RopeConfig, LoadError> {
        let local_classic = layer == LayerType::Sliding && self.rope_parameters.is_none();
        let raw = if local_classic { None } else { self.raw_rope(layer) };
        let theta = match (local_classic, self.rope_local_base_freq) {
            (true, Some(local)) => local,
            _ => raw
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(self.rope_theta)
                .unwrap_or(10_000.0),
        };
        let partial = raw
            .as_ref()
            .and_then(|r| r.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let mut rotary_dim = (head_dim as f32 * partial) as usize;
        let mut scaling = self.rope_scaling_of(raw.as_ref())?;
        if let RopeScaling::Proportional { rotated, .. } = &mut scaling {
            // transformers: `int(partial_rotary_factor * head_dim // 2)` pairs turn.
            *rotated = rotary_dim / 2;
            rotary_dim = head_dim;
        }
        Ok(RopeConfig {
            theta,
            scaling,
            rotary_dim,
        })
    }

    fn rope_scaling_of(&self, raw: Option<&RawRope>) -> Result<RopeScaling, LoadError> {
        let bad = |what: &str| LoadError::Malformed {
            file: "config.json".into(),
            reason: format!("rope scaling is missing `{what}`"),
        };
        let Some((r, kind)) = raw.and_then(|r| r.rope_type.as_deref().map(|t| (r, t))) else {
            return Ok(RopeScaling::None);
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: r.factor.ok_or_else(|| bad("factor"))?,
            },
            "proportional" => RopeScaling::Proportional {
                rotated: 0, // set from the head width by `rope_for_head`
                factor: r.factor.unwrap_or(1.0),
            },
            "llama3" => RopeScaling::Llama3 {
                factor: r.factor.ok_or_else(|| bad("factor"))?,
                low_freq_factor: r.low_freq_factor.ok_or_else(|| bad("low_freq_factor"))?,
                high_freq_factor: r.high_freq_factor.ok_or_else(|| bad("high_freq_factor"))?,
                original_max_position_embeddings: r
                    .original_max_position_embeddings
                    .ok_or_else(|| bad("original_max_position_embeddings"))?,
            },
            "yarn" => {
                let original = r
                    .original_max_position_embeddings
                    .ok_or_else(|| bad("original_max_position_embeddings"))?;
                let factor = r.factor.unwrap_or(self.max_position_embeddings as f32 / original);
                // YaRN's `0.1 · mscale · ln(factor) + 1`.
                let mscale = |m: f32| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * factor.ln() + 1.0
                    }
                };
                let attention_factor = r.attention_factor.unwrap_or(match (r.mscale, r.mscale_all_dim) {
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                    _ => mscale(1.0),
                });
                RopeScaling::Yarn {
                    factor,
                    beta_fast: r.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: r.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0),
                    original_max_position_embeddings: original,
                    truncate: r.truncate.unwrap_or(true),
                    attention_factor,
                }
            }
            "longrope" | "su" => {
                let original = self
                    .original_max_position_embeddings
                    .or(r.original_max_position_embeddings.map(|v| v as usize))
                    .unwrap_or(self.max_position_embeddings);
                let factor = self.max_position_embeddings as f32 / original as f32;
                let attention_factor = r.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f32).ln()).sqrt()
                });
                RopeScaling::LongRope {
                    short_factor: r.short_factor.clone().ok_or_else(|| bad("short_factor"))?,
                    long_factor: r.long_factor.clone().ok_or_else(|| bad("long_factor"))?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err(LoadError::Unsupported(format!(
                    "rope scaling type `{other}` (supported: default, linear, llama3, longrope, proportional, yarn)"
                )))
            }
        })
    }
}

/// `use_bidirectional_attention` as a string (Gemma 4), a boolean (Gemma 3: `true` is every
/// layer, `all`) or absent.
fn bidirectional_attention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) => Some(s),
        Some(Value::Bool(true)) => Some("all".into()),
        Some(Value::Bool(false)) | Some(Value::Null) | None => None,
        Some(other) => {
            return Err(serde::de::Error::custom(format!(
                "use_bidirectional_attention must be a string or a boolean, got {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gpt-oss's YaRN (θ 150000, factor 32, betas 32 and 1, 4096 original positions, head 64):
    /// frequencies and cos/sin factor as transformers 5.25's `_compute_yarn_parameters` gives
    /// them, with and without `truncate`.
    #[test]
    fn yarn_frequencies_match_transformers() -> Result<(), LoadError> {
        let cases = [
            (
                false,
                [
                    1.0,
                    0.155_323,
                    0.019_335,
                    0.001_052_602,
                    1.818_834e-5,
                    2.825_067e-6,
                    3.023_511e-7,
                ],
            ),
            (
                true,
                [
                    1.0,
                    0.155_323,
                    0.019_450_966,
                    0.001_206_131,
                    1.818_834e-5,
                    2.825_067e-6,
                    3.023_511e-7,
                ],
            ),
        ];
        for (truncate, want) in cases {
            let text = format!(
                r#"{{"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "head_dim": 64, "vocab_size": 8,
                "rope_parameters": {{"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": {truncate}, "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0}}}}"#
            );
            let rope = HfConfig::parse(&text, "config.json")?.rope(LayerType::Full)?;
            let RopeScaling::Yarn { attention_factor, .. } = rope.scaling else {
                panic!("not YaRN: {:?}", rope.scaling);
            };
            assert!((attention_factor - 1.346_573_6).abs() < 1e-6, "{attention_factor}");
            let freqs = rope.inv_freq(None);
            for (&i, want) in [0, 5, 10, 15, 20, 25, 31].iter().zip(want) {
                assert!(
                    (freqs[i] - want).abs() <= want * 1e-5,
                    "truncate {truncate}, frequency {i}: {} vs {want}",
                    freqs[i]
                );
            }
        }
        Ok(())
    }
}
