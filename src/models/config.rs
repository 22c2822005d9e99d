//! `config.json` of a Hugging Face model folder, as far as the decoder families need it.

use serde::Deserialize;

use super::LoadError;

/// Rotary embedding frequencies, including the scaling schemes real checkpoints use.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base θ of the frequencies.
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
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
}

impl RopeConfig {
    /// `inv_freq[i] = 1 / θ^(2i/d)`, then scaled; computed in f32 as transformers does.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Raw `rope_scaling` (classic) or `rope_parameters` (transformers 5) object.
#[derive(Clone, Debug, Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
}

/// The fields of a Llama-style `config.json`.
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
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE θ (classic key).
    pub rope_theta: Option<f32>,
    #[serde(default)]
    rope_scaling: Option<RawRope>,
    #[serde(default)]
    rope_parameters: Option<RawRope>,
    /// lm_head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v/o carry biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// MLP projections carry biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation; only `silu` is supported by the Llama family.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// EOS id(s) as in config.json (an int or a list).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
}

fn default_max_position() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".to_string()
}

impl HfConfig {
    /// Parses `config.json` text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, LoadError> {
        serde_json::from_str(text).map_err(|e| LoadError::Malformed {
            file: file.to_string(),
            reason: e.to_string(),
        })
    }

    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Rotary configuration from either the classic or the transformers-5 keys.
    pub fn rope(&self) -> Result<RopeConfig, LoadError> {
        let raw = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_theta
            .or_else(|| raw.and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let bad = |what: &str| LoadError::Malformed {
            file: "config.json".into(),
            reason: format!("rope scaling is missing `{what}`"),
        };
        let scaling = match raw.and_then(|r| r.rope_type.as_deref().map(|t| (r, t))) {
            None | Some((_, "default")) => RopeScaling::None,
            Some((r, "linear")) => RopeScaling::Linear {
                factor: r.factor.ok_or_else(|| bad("factor"))?,
            },
            Some((r, "llama3")) => RopeScaling::Llama3 {
                factor: r.factor.ok_or_else(|| bad("factor"))?,
                low_freq_factor: r.low_freq_factor.ok_or_else(|| bad("low_freq_factor"))?,
                high_freq_factor: r.high_freq_factor.ok_or_else(|| bad("high_freq_factor"))?,
                original_max_position_embeddings: r
                    .original_max_position_embeddings
                    .ok_or_else(|| bad("original_max_position_embeddings"))?,
            },
            Some((_, other)) => {
                return Err(LoadError::Unsupported(format!(
                    "rope scaling type `{other}` (supported: default, linear, llama3)"
                )))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

/// Reads a token id or list of ids from a JSON value (`eos_token_id` may be either).
pub fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}
