//! GGUF files (llama.cpp / Ollama): metadata → the equivalent Hugging Face config, tensors by
//! Hugging Face names (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`),
//! float tensors dense, block-quantized ones kept for candle's quantized matmul.
//!
//! llama.cpp conventions honoured here: the `llama` architecture's q/k rows are permuted for
//! interleaved ("normal") rope; Gemma norms are stored with the +1 already added; Llama 3 rope
//! scaling is a `rope_freqs` tensor of per-frequency divisors; a missing `output.weight` means
//! tied embeddings; a mixture of experts stores each projection of all experts as one 3-D
//! tensor (`blk.N.ffn_gate_exps`, `[experts, out, in]`), read here one expert at a time
//! (`model.layers.N.mlp.experts.E.gate_proj` is expert E's rows), and a `llama` file with
//! experts is Mixtral.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use serde_json::json;

use super::gguf_header::{GgufHeader, TensorInfo, TensorType};
use super::mxfp4::Mxfp4Matrix;
use super::LoadError;

/// A tensor's bytes as the file stores them.
struct Stored {
    kind: TensorType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Stored {
    /// As candle's quantized tensor on `device` (any type but MXFP4); `name` is for errors.
    fn qtensor(self, name: &str, device: &Device) -> Result<QTensor> {
        let TensorType::Ggml(dtype) = self.kind else {
            candle_core::bail!("`{name}` is {}, which only linear and expert weights may be", self.kind);
        };
        QTensor::new(
            QStorage::from_data(std::borrow::Cow::Owned(self.data), device, dtype)?,
            self.shape,
        )
    }
}

/// An open GGUF file.
pub struct GgufStore {
    header: GgufHeader,
    file: Mutex<File>,
    arch: String,
    dtype: DType,
    device: Device,
}

impl GgufStore {
    /// Reads the header and metadata of `path`.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let malformed = |reason: String| LoadError::Malformed {
            file: path.display().to_string(),
            reason,
        };
        let mut file = File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let header = GgufHeader::read(&mut file).map_err(|e| malformed(format!("not a valid GGUF file ({e})")))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        for (name, info) in &header.tensors {
            if header.data_offset + info.offset + info.bytes() as u64 > len {
                return Err(malformed(format!(
                    "truncated: tensor `{name}` extends past the end of the file"
                )));
            }
        }
        let arch = header
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| malformed("no general.architecture".into()))?;
        Ok(Self {
            header,
            file: Mutex::new(file),
            arch,
            dtype,
            device: device.clone(),
        })
    }

    /// `general.architecture` (llama, qwen2, qwen3, gemma3, phi3, …).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// All metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.header.metadata
    }

    /// Parameters over all tensors.
    pub fn num_params(&self) -> usize {
        self.header.tensors.values().map(|t| t.shape.elem_count()).sum()
    }

    /// The ggml type holding most parameters (`Q4_0`, `F16`, `MXFP4`, …).
    pub fn dominant_type(&self) -> String {
        let mut by_type: HashMap<String, usize> = HashMap::new();
        for t in self.header.tensors.values() {
            *by_type.entry(t.kind.to_string()).or_default() += t.shape.elem_count();
        }
        by_type
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(t, _)| t)
            .unwrap_or_default()
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// True when the Hugging Face-named tensor exists in the file.
    pub fn contains(&self, hf_name: &str) -> bool {
        let Some(info) = self.gguf_name(hf_name).and_then(|n| self.header.tensors.get(&n)) else {
            return false;
        };
        expert_of(hf_name).is_none_or(|e| info.shape.dims().first().is_some_and(|&n| e < n))
    }

    /// The stored bytes of a Hugging Face-named tensor.
    fn read_stored(&self, hf_name: &str) -> Result<Stored> {
        let name = self
            .gguf_name(hf_name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no GGUF name for `{hf_name}`")))?;
        self.stored(&name, expert_of(hf_name))
    }

    /// The stored bytes of the GGUF tensor `name`: the whole tensor, or an expert's slice of a
    /// `[experts, …]` one (`[experts, out, in]` weights, `[experts, out]` biases), which is one
    /// contiguous run of the file, read alone.
    fn stored(&self, name: &str, expert: Option<usize>) -> Result<Stored> {
        let info = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("GGUF tensor `{name}` is missing")))?;
        let (shape, skip) = match expert {
            None => (info.shape.dims().to_vec(), 0),
            Some(expert) => {
                let Some((&experts, per_expert)) = info.shape.dims().split_first().filter(|(_, rest)| !rest.is_empty())
                else {
                    candle_core::bail!("GGUF tensor `{name}` has shape {:?}, expected [experts, …]", info.shape);
                };
                if expert >= experts {
                    candle_core::bail!("GGUF tensor `{name}` holds {experts} experts, not expert {expert}");
                }
                let bytes = info.kind.bytes(per_expert.iter().product());
                (per_expert.to_vec(), expert * bytes)
            }
        };
        let mut data = vec![0u8; info.kind.bytes(shape.iter().product())];
        let mut file = self
            .file
            .lock()
            .map_err(|_| candle_core::Error::Msg("GGUF file lock poisoned".into()))?;
        file.seek(SeekFrom::Start(self.header.data_offset + info.offset + skip as u64))?;
        file.read_exact(&mut data)?;
        Ok(Stored {
            kind: info.kind,
            shape,
            data,
        })
    }

    /// The tensor as candle's quantized tensor on `device` (any type but MXFP4).
    fn read(&self, hf_name: &str, device: &Device) -> Result<QTensor> {
        self.read_stored(hf_name)?.qtensor(hf_name, device)
    }

    /// A float tensor (or any tensor, dequantized) in the compute dtype.
    pub fn dense(&self, hf_name: &str) -> Result<Tensor> {
        if let Some(m) = self.mxfp4(hf_name) {
            return m?.dequantized(&self.device, self.dtype);
        }
        self.read(hf_name, &self.device)?
            .dequantize(&self.device)?
            .to_dtype(self.dtype)
    }

    /// The tensor's info, when the file holds it (for experts: the tensor holds that expert).
    fn info(&self, hf_name: &str) -> Option<&TensorInfo> {
        let info = self.header.tensors.get(&self.gguf_name(hf_name)?)?;
        let holds = expert_of(hf_name).is_none_or(|e| info.shape.dims().first().is_some_and(|&n| e < n));
        holds.then_some(info)
    }

    /// The tensor, when it is block-quantized in a type candle holds, or F16 on the CPU, where
    /// it stays f16 (other float tensors are read with `dense`, MXFP4 with `mxfp4`).
    pub fn quantized(&self, hf_name: &str) -> Option<Result<QTensor>> {
        let dense = match self.info(hf_name)?.kind {
            TensorType::Ggml(GgmlDType::F32 | GgmlDType::BF16) | TensorType::Mxfp4 => true,
            TensorType::Ggml(GgmlDType::F16) => !self.device.is_cpu(),
            TensorType::Ggml(_) => false,
        };
        (!dense).then(|| self.read(hf_name, &self.device))
    }

    /// The matrix, when it is MXFP4 (gpt-oss's experts).
    pub fn mxfp4(&self, hf_name: &str) -> Option<Result<Mxfp4Matrix>> {
        if self.info(hf_name)?.kind != TensorType::Mxfp4 {
            return None;
        }
        Some(
            self.read_stored(hf_name)
                .and_then(|Stored { shape, data, .. }| match shape[..] {
                    [rows, cols] => Mxfp4Matrix::from_gguf(data, rows, cols),
                    _ => candle_core::bail!("MXFP4 tensor for `{hf_name}` has shape {shape:?}, expected a matrix"),
                }),
        )
    }

    /// The per-frequency rope divisors of Llama 3 scaling, when present.
    pub fn rope_freqs(&self) -> Result<Option<Vec<f32>>> {
        if !self.header.tensors.contains_key("rope_freqs.weight") {
            return Ok(None);
        }
        let t = self
            .stored("rope_freqs.weight", None)?
            .qtensor("rope_freqs.weight", &Device::Cpu)?;
        Ok(Some(t.dequantize(&Device::Cpu)?.to_vec1()?))
    }

    /// Maps a Hugging Face tensor name to the GGUF one.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        if self.arch == "clip" {
            return clip_name(hf);
        }
        // Gemma 4's layer tensors whose Hugging Face names have no `.weight`.
        if let Some((layer, leaf)) = hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
            let gguf = match leaf {
                "layer_scalar" => Some("layer_output_scale.weight"),
                "router.scale" => Some("ffn_gate_inp.scale"),
                "router.per_expert_scale" => Some("ffn_down_exps.scale"),
                "self_attn.sinks" => Some("attn_sinks.weight"),
                _ => None,
            };
            if let Some(gguf) = gguf {
                return Some(format!("blk.{layer}.{gguf}"));
            }
        }
        let (stem, suffix) = hf.rsplit_once('.')?;
        let mapped = match stem {
            "model.embed_tokens" => "token_embd".to_string(),
            "model.norm" => "output_norm".to_string(),
            "lm_head" => "output".to_string(),
            "model.embed_tokens_per_layer" => "per_layer_token_embd".to_string(),
            "model.per_layer_model_projection" => "per_layer_model_proj".to_string(),
            "model.per_layer_projection_norm" => "per_layer_proj_norm".to_string(),
            _ => {
                let rest = stem.strip_prefix("model.layers.")?;
                let (layer, module) = rest.split_once('.')?;
                format!("blk.{layer}.{}", self.block_module(module)?)
            }
        };
        Some(format!("{mapped}.{suffix}"))
    }

    fn block_module(&self, module: &str) -> Option<&'static str> {
        // Gemma's sandwich norms, and gpt-oss's pre-MLP norm, are `post_attention_norm`.
        let sandwich = self.arch.starts_with("gemma") || self.arch == "gpt-oss";
        if let Some((_, projection)) = expert_parts(module) {
            return Some(match projection {
                "gate_proj" | "w1" => "ffn_gate_exps",
                "up_proj" | "w3" => "ffn_up_exps",
                "gate_up_proj" => "ffn_gate_up_exps",
                "down_proj" | "w2" => "ffn_down_exps",
                _ => return None,
            });
        }
        Some(match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" if sandwich => "post_attention_norm",
            "post_attention_layernorm" | "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.qkv_proj" => "attn_qkv",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "mlp.gate" | "block_sparse_moe.gate" | "router.proj" | "mlp.router" => "ffn_gate_inp",
            "pre_feedforward_layernorm_2" => "pre_ffw_norm_2",
            "post_feedforward_layernorm_1" => "post_ffw_norm_1",
            "post_feedforward_layernorm_2" => "post_ffw_norm_2",
            "per_layer_input_gate" => "inp_gate",
            "per_layer_projection" => "proj",
            "post_per_layer_input_norm" => "post_norm",
            _ => return None,
        })
    }

    fn meta_u64(&self, key: &str) -> Option<u64> {
        let v = self.header.metadata.get(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().map(|x| x as u64))
    }

    /// A per-layer integer key: an array, or one value for every layer.
    fn meta_u64s(&self, key: &str) -> Option<Vec<u64>> {
        if let Some(v) = self.meta_u64(key) {
            return Some(vec![v]);
        }
        let values = self.header.metadata.get(key)?.to_vec().ok()?;
        values
            .iter()
            .map(|v| {
                v.to_u32()
                    .ok()
                    .map(u64::from)
                    .or_else(|| v.to_i32().ok().map(|x| x as u64))
            })
            .collect()
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.header.metadata.get(key)?.to_f32().ok()
    }

    /// A `clip` (mmproj) file's vision tower as Hugging Face's `vision_config` names it, with
    /// `mm_tokens_per_image` and the processor's `image_mean` / `image_std`, for the vision
    /// loader; None unless the file is a Gemma 3 projector.
    pub fn clip_config(&self) -> Option<serde_json::Value> {
        let projector = self.header.metadata.get("clip.projector_type")?.to_string().ok()?;
        if self.arch != "clip" || projector != "gemma3" {
            return None;
        }
        let u = |key: &str| self.meta_u64(&format!("clip.vision.{key}"));
        let (image_size, patch_size) = (u("image_size")?, u("patch_size")?);
        // llama.cpp writes the pooling only where it is not Gemma 3's 4 (tiny test models).
        let pool = u("projector.scale_factor").unwrap_or(4).max(1);
        let per_side = image_size / patch_size.max(1) / pool;
        let floats = |key: &str| -> Option<Vec<f32>> {
            let values = self.header.metadata.get(&format!("clip.vision.{key}"))?.to_vec().ok()?;
            values.iter().map(|v| v.to_f32().ok()).collect()
        };
        Some(serde_json::json!({
            "vision_config": {
                "hidden_size": u("embedding_length")?,
                "intermediate_size": u("feed_forward_length")?,
                "num_hidden_layers": u("block_count")?,
                "num_attention_heads": u("attention.head_count")?,
                "image_size": image_size,
                "patch_size": patch_size,
                "layer_norm_eps": self.meta_f32("clip.vision.attention.layer_norm_epsilon").unwrap_or(1e-6),
            },
            "mm_tokens_per_image": per_side * per_side,
            "image_mean": floats("image_mean").unwrap_or_else(|| vec![0.5; 3]),
            "image_std": floats("image_std").unwrap_or_else(|| vec![0.5; 3]),
        }))
    }

    /// The id of the vocabulary entry `token` (`tokenizer.ggml.tokens`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        let tokens = self.header.metadata.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
        tokens
            .iter()
            .position(|t| t.to_string().is_ok_and(|s| s == token))
            .map(|i| i as u32)
    }

    /// The Hugging Face `config.json` equivalent of the metadata, so the family spec
    /// builders serve GGUF too.
    pub fn hf_config(&self) -> std::result::Result<serde_json::Value, LoadError> {
        let a = self.arch.as_str();
        let experts = self.meta_u64(&format!("{a}.expert_count")).filter(|&n| n > 0);
        let (architecture, model_type) = match a {
            "llama" if experts.is_some() => ("MixtralForCausalLM", "mixtral"),
            "llama" => ("LlamaForCausalLM", "llama"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
            "qwen3moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
            "gemma4" => ("Gemma4ForCausalLM", "gemma4_text"),
            "phi3" => ("Phi3ForCausalLM", "phi3"),
            "gpt-oss" => ("GptOssForCausalLM", "gpt_oss"),
            other => {
                return Err(LoadError::Unsupported(format!(
                    "GGUF architecture `{other}` (supported: llama (and Mixtral), qwen2, qwen3, qwen3moe, gemma3, \
                     gemma4, gpt-oss, phi3)"
                )))
            }
        };
        let need = |key: &str| {
            self.meta_u64(&format!("{a}.{key}"))
                .ok_or_else(|| LoadError::Malformed {
                    file: "GGUF metadata".into(),
                    reason: format!("missing `{a}.{key}`"),
                })
        };
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let head_dim = self
            .meta_u64(&format!("{a}.attention.key_length"))
            .unwrap_or(hidden / heads);
        // The embedding's rows: real vocabularies are often padded beyond the token list.
        let vocab = self
            .header
            .tensors
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().map(|&n| n as u64))
            .or_else(|| {
                self.header
                    .metadata
                    .get("tokenizer.ggml.tokens")
                    .and_then(|t| t.to_vec().ok())
                    .map(|t| t.len() as u64)
            })
            .or_else(|| self.meta_u64(&format!("{a}.vocab_size")))
            .ok_or_else(|| LoadError::Malformed {
                file: "GGUF metadata".into(),
                reason: "no vocabulary (tokenizer.ggml.tokens)".into(),
            })?;
        let mut cfg = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": hidden,
            // Gemma 4 lists it per layer (double-wide MLPs): the narrowest is the base width.
            "intermediate_size": self
                .meta_u64s(&format!("{a}.feed_forward_length"))
                .and_then(|w| w.into_iter().min())
                .ok_or_else(|| LoadError::Malformed {
                    file: "GGUF metadata".into(),
                    reason: format!("missing `{a}.feed_forward_length`"),
                })?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta_u64(&format!("{a}.attention.head_count_kv")).unwrap_or(heads),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": need("context_length")?,
            "rms_norm_eps": self.meta_f32(&format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": self.meta_f32(&format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
            "tie_word_embeddings": !self.header.tensors.contains_key("output.weight"),
            "eos_token_id": self.meta_u64("tokenizer.ggml.eos_token_id"),
        });
        if let Some(experts) = experts {
            // llama.cpp renormalizes the kept experts' weights of both families.
            cfg["num_experts"] = json!(experts);
            cfg["num_local_experts"] = json!(experts);
            cfg["num_experts_per_tok"] = json!(need("expert_used_count")?);
            cfg["norm_topk_prob"] = json!(true);
            if let Some(width) = self.meta_u64(&format!("{a}.expert_feed_forward_length")) {
                cfg["moe_intermediate_size"] = json!(width);
            }
        }
        if let Some(dims) = self.meta_u64(&format!("{a}.rope.dimension_count")) {
            cfg["partial_rotary_factor"] = json!(dims as f64 / head_dim as f64);
        }
        if let (Some("linear"), Some(factor)) = (
            self.header
                .metadata
                .get(&format!("{a}.rope.scaling.type"))
                .and_then(|v| v.to_string().ok())
                .map(String::as_str),
            self.meta_f32(&format!("{a}.rope.scaling.factor")),
        ) {
            cfg["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        if let Some(w) = self.meta_u64(&format!("{a}.attention.sliding_window")) {
            cfg["sliding_window"] = json!(w);
        }
        if a == "gemma3" {
            // llama.cpp's Gemma 3 semantics: 1/sqrt(head_dim) scaling, and without a pattern key
            // five sliding layers per global one.
            cfg["query_pre_attn_scalar"] = json!(head_dim);
            cfg["sliding_window_pattern"] =
                json!(self.meta_u64("gemma3.attention.sliding_window_pattern").unwrap_or(6));
            cfg["rope_local_base_freq"] = json!(self.meta_f32("gemma3.rope.freq_base_swa").unwrap_or(10_000.0));
            cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
        }
        if a == "gemma4" {
            self.gemma4_config(&mut cfg)?;
        }
        if a == "gpt-oss" {
            self.gpt_oss_config(&mut cfg)?;
        }
        Ok(cfg)
    }

    /// gpt-oss's keys in transformers' terms, as llama.cpp reads them: even layers slide (its
    /// pattern of 2), YaRN with the correction range rounded outwards, and the SwiGLU clamp
    /// llama.cpp hard-codes (transformers' defaults).
    fn gpt_oss_config(&self, cfg: &mut serde_json::Value) -> std::result::Result<(), LoadError> {
        let layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0);
        cfg["layer_types"] = json!((0..layers)
            .map(|i| if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            })
            .collect::<Vec<_>>());
        cfg["attention_bias"] = json!(true);
        let scaling = self
            .header
            .metadata
            .get("gpt-oss.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        if scaling == Some("yarn") {
            let missing = |key: &str| LoadError::Malformed {
                file: "GGUF metadata".into(),
                reason: format!("missing `gpt-oss.rope.scaling.{key}`"),
            };
            cfg["rope_scaling"] = json!({
                "rope_type": "yarn",
                "factor": self.meta_f32("gpt-oss.rope.scaling.factor").ok_or_else(|| missing("factor"))?,
                "original_max_position_embeddings": self
                    .meta_u64("gpt-oss.rope.scaling.original_context_length")
                    .ok_or_else(|| missing("original_context_length"))?,
                "truncate": true,
            });
        }
        Ok(())
    }

    /// Gemma 4's keys in transformers' terms: layer types from the sliding-window pattern,
    /// global layers' head width (`key_length`; sliding ones: `key_length_swa`) and KV heads
    /// (`head_count_kv` per layer) as `per_layer_config`, values equal to keys where a global
    /// layer has no `attn_v`, double-wide MLPs from the per-layer widths, shared-KV layers,
    /// per-layer inputs and experts. The proportional rope of global layers is the
    /// `rope_freqs` divisors (1e30 where a pair stands still), applied as for Llama 3.
    fn gemma4_config(&self, cfg: &mut serde_json::Value) -> std::result::Result<(), LoadError> {
        let malformed = |key: &str| LoadError::Malformed {
            file: "GGUF metadata".into(),
            reason: format!("missing or malformed `gemma4.{key}`"),
        };
        let layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
        if !self.header.tensors.contains_key("rope_freqs.weight") {
            // The global layers' proportional rope lives only there (llama.cpp requires it too).
            return Err(LoadError::Malformed {
                file: "GGUF tensors".into(),
                reason: "a gemma4 file without `rope_freqs.weight`".into(),
            });
        }
        let sliding: Vec<bool> = self
            .header
            .metadata
            .get("gemma4.attention.sliding_window_pattern")
            .and_then(|v| v.to_vec().ok())
            .and_then(|vs| vs.iter().map(|v| v.to_bool().ok()).collect::<Option<Vec<bool>>>())
            .filter(|p| p.len() == layers)
            .ok_or_else(|| malformed("attention.sliding_window_pattern"))?;
        let head_full = self
            .meta_u64("gemma4.attention.key_length")
            .ok_or_else(|| malformed("attention.key_length"))?;
        let head_swa = self
            .meta_u64("gemma4.attention.key_length_swa")
            .ok_or_else(|| malformed("attention.key_length_swa"))?;
        let kv_heads = self
            .meta_u64s("gemma4.attention.head_count_kv")
            .map(|v| if v.len() == 1 { vec![v[0]; layers] } else { v })
            .filter(|v| v.len() == layers)
            .ok_or_else(|| malformed("attention.head_count_kv"))?;
        let widths = self.meta_u64s("gemma4.feed_forward_length").unwrap_or_default();
        let base_width = cfg["intermediate_size"].as_u64().unwrap_or(0);
        let first_full = sliding.iter().position(|s| !s);
        let per_layer: serde_json::Map<String, serde_json::Value> = (0..layers)
            .filter(|&i| !sliding[i])
            .map(|i| {
                (
                    i.to_string(),
                    json!({"head_dim": head_full, "num_key_value_heads": kv_heads[i]}),
                )
            })
            .collect();
        let rope = |key: &str, head: u64| {
            let dims = self.meta_u64(&format!("gemma4.{key}")).unwrap_or(head);
            dims as f64 / head as f64
        };
        cfg["layer_types"] = json!(sliding
            .iter()
            .map(|&s| if s { "sliding_attention" } else { "full_attention" })
            .collect::<Vec<_>>());
        cfg["head_dim"] = json!(head_swa);
        cfg["num_key_value_heads"] = json!(sliding.iter().position(|&s| s).map_or(kv_heads[0], |i| kv_heads[i]));
        cfg["per_layer_config"] = json!(per_layer);
        cfg["attention_k_eq_v"] = json!(first_full.is_some_and(|i| {
            let has = |t: &str| self.header.tensors.contains_key(&format!("blk.{i}.{t}.weight"));
            has("attn_k") && !has("attn_v")
        }));
        cfg["rope_parameters"] = json!({
            "full_attention": {"rope_type": "default", "rope_theta": self.meta_f32("gemma4.rope.freq_base").unwrap_or(1e6),
                               "partial_rotary_factor": rope("rope.dimension_count", head_full)},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.meta_f32("gemma4.rope.freq_base_swa").unwrap_or(1e4),
                                  "partial_rotary_factor": rope("rope.dimension_count_swa", head_swa)},
        });
        if let Some(obj) = cfg.as_object_mut() {
            obj.remove("partial_rotary_factor");
            obj.remove("rope_theta");
        }
        cfg["use_double_wide_mlp"] = json!(widths.iter().any(|&w| w == 2 * base_width));
        cfg["num_kv_shared_layers"] = json!(self.meta_u64("gemma4.attention.shared_kv_layers").unwrap_or(0));
        if let Some(width) = self
            .meta_u64("gemma4.embedding_length_per_layer_input")
            .filter(|&w| w > 0)
        {
            cfg["hidden_size_per_layer_input"] = json!(width);
            let rows = self
                .header
                .tensors
                .get("per_layer_token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| malformed("per_layer_token_embd (tensor)"))?;
            cfg["vocab_size_per_layer_input"] = json!(rows);
        }
        if let Some(cap) = self.meta_f32("gemma4.final_logit_softcapping") {
            cfg["final_logit_softcapping"] = json!(cap);
        }
        cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
        if cfg.get("num_experts").is_some() {
            cfg["enable_moe_block"] = json!(true);
            cfg["top_k_experts"] = cfg["num_experts_per_tok"].clone();
        }
        Ok(())
    }
}

/// The expert and projection named by a layer module `mlp.experts.E.gate_proj` (Qwen-MoE),
/// `block_sparse_moe.experts.E.w1` (Mixtral) or `experts.E.gate_up_proj` (Gemma 4).
/// The mmproj name (llama.cpp's `clip` files) of a Gemma 3 vision tensor's Hugging Face name
/// (`vision_tower.vision_model.*`, `multi_modal_projector.*`).
fn clip_name(hf: &str) -> Option<String> {
    if let Some(rest) = hf.strip_prefix("multi_modal_projector.") {
        return match rest {
            "mm_input_projection_weight" => Some("mm.input_projection.weight".into()),
            "mm_soft_emb_norm.weight" => Some("mm.soft_emb_norm.weight".into()),
            _ => None,
        };
    }
    let rest = hf.strip_prefix("vision_tower.vision_model.")?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    let mapped = match stem {
        "embeddings.patch_embedding" => "v.patch_embd".to_string(),
        "embeddings.position_embedding" => "v.position_embd".to_string(),
        "post_layernorm" => "v.post_ln".to_string(),
        _ => {
            let (layer, module) = stem.strip_prefix("encoder.layers.")?.split_once('.')?;
            let module = match module {
                "layer_norm1" => "ln1",
                "layer_norm2" => "ln2",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.out_proj" => "attn_out",
                "mlp.fc1" => "ffn_up",
                "mlp.fc2" => "ffn_down",
                _ => return None,
            };
            format!("v.blk.{layer}.{module}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

fn expert_parts(module: &str) -> Option<(usize, &str)> {
    let rest = module
        .strip_prefix("mlp.experts.")
        .or_else(|| module.strip_prefix("block_sparse_moe.experts."))
        .or_else(|| module.strip_prefix("experts."))?;
    let (expert, projection) = rest.split_once('.')?;
    Some((expert.parse().ok()?, projection))
}

/// The expert a Hugging Face tensor name belongs to, if any.
fn expert_of(hf_name: &str) -> Option<usize> {
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (_, module) = rest.split_once('.')?;
    expert_parts(module).map(|(e, _)| e)
}
