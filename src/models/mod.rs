//! What a model is: the forward contract the engine uses (`Model`), the one transformer
//! (`decoder`, driven by a `DecoderSpec`), the family files that map a config.json onto a spec
//! (`llama`, `gemma3`, `gemma4`, `phi3`), and `load()`, which opens a folder or GGUF file (`formats`) and
//! picks the family. Families are written in compute's layer types (`compute::layers`,
//! `compute::attention`) and never see a device, a kernel or a file format.
//!
//! Owner: the engine thread. Models are stateless (`&self`): KV lives in `PagedKvCache` and
//! positions come from `BatchInput`, so one model serves any mix of sequences.

pub mod config;
pub mod decoder;
pub mod feed_forward;
pub mod gemma3;
pub mod gemma4;
pub mod gpt_oss;
pub mod llama;
pub mod phi3;
pub mod vision;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::compute::batch::BatchInput;
use crate::compute::paged_kv::PagedKvCache;
use crate::compute::Numerics;
use crate::formats::{is_gguf, read_text, LoadError, LoadProgress};

/// Architecture facts the engine and server need, independent of the family.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `architectures[0]` from config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// Width of the hidden states (the size of an embedding).
    pub hidden_size: usize,
    /// Decoder layers (each keeps KV).
    pub num_layers: usize,
    /// KV heads per layer (of the sliding layers where global ones differ).
    pub num_kv_heads: usize,
    /// Head dimension (of the sliding layers where global ones differ).
    pub head_dim: usize,
    /// Per layer that keeps KV, in order: its KV heads times head dimension. Layers reading
    /// another layer's KV (Gemma 4) have no entry. Set by the decoder as it loads.
    pub kv_widths: Vec<usize>,
    /// Vocabulary size (logit width).
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Parameters in the weight files.
    pub num_params: usize,
    /// Compute dtype.
    pub dtype: DType,
    /// EOS ids from config.json.
    pub eos_token_ids: Vec<u32>,
    /// `model_type` from config.json (the family, e.g. `llama`).
    pub model_type: String,
    /// What the weight files are (format, dtype, size, digest).
    pub weights: crate::formats::weights::WeightsSummary,
    /// config.json as loaded, for APIs that report architecture details.
    pub hf_config: serde_json::Value,
    /// How the model takes images (None: text only).
    pub vision: Option<vision::VisionFacts>,
}

/// The forward contract: one packed pass over every scheduled token.
pub trait Model: Send {
    /// Architecture facts.
    fn config(&self) -> &ModelConfig;
    /// Runs all tokens of `batch`, writing their K/V into `kv`; returns `[S, vocab]` f32
    /// logits for the rows in `batch.logits_rows`.
    fn forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> candle_core::Result<Tensor>;

    /// Like `forward`, and also the final hidden states (after the last norm, f32) of the rows
    /// in `hidden_rows` (`[H]` u32): what embeddings are pooled from.
    fn forward_hidden(
        &self,
        batch: &BatchInput,
        hidden_rows: &Tensor,
        kv: &mut PagedKvCache,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let _ = (batch, hidden_rows, kv);
        Err(candle_core::Error::Msg("this model does not give hidden states".into()))
    }

    /// `[N, 3, size, size]` prepared images → `[N, tokens_per_image, hidden]` soft-token
    /// embeddings for `BatchInput::images` (vision models; see `ModelConfig::vision`).
    fn encode_images(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let _ = pixels;
        Err(candle_core::Error::Msg("this model has no vision input".into()))
    }
}

/// `architectures[0]` values mlxd can load.
pub const SUPPORTED_ARCHITECTURES: [&str; 12] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Gemma4ForCausalLM",
    "Gemma4ForConditionalGeneration",
    "GptOssForCausalLM",
    "Phi3ForCausalLM",
];

/// Loads a model: a Hugging Face folder, or a `.gguf` file with its vision tower in an
/// `mmproj` file beside it (llama.cpp's `--mmproj`), onto `device`, computing in `dtype`
/// (GGUF models compute in f32) with `numerics`.
pub fn load(
    path: &Path,
    mmproj: Option<&Path>,
    device: &Device,
    dtype: DType,
    numerics: Numerics,
    progress: &LoadProgress,
) -> Result<Box<dyn Model>, LoadError> {
    if is_gguf(path) {
        return load_gguf(path, mmproj, device, numerics, progress);
    }
    if let Some(mmproj) = mmproj {
        return Err(LoadError::Unsupported(format!(
            "--mmproj {}: a projector file goes with a GGUF model; a Hugging Face folder brings its own tower",
            mmproj.display()
        )));
    }
    let (cfg, raw_config, weights, summary) = open_hf(path)?;
    check_quantization_supported(&raw_config)?;
    let mut model_config = model_config(&cfg, dtype, weights.num_params(), summary, raw_config);
    let vb = crate::formats::source::WeightSource::hf(weights.var_builder(dtype, device)?, numerics);
    let spec = family_spec(&cfg, &vb)?;
    let vision = match model_config.architecture.as_str() {
        "Gemma3ForConditionalGeneration" => {
            let source = vision::Gemma3Vision::from_folder(&vb, &model_config.hf_config, path)?;
            vision::VisionEncoder::load_gemma3(&source, cfg.hidden_size)?
        }
        _ => None,
    };
    model_config.vision = vision.as_ref().map(|(_, facts)| facts.clone());
    let model = decoder::Decoder::load(vb, &spec, model_config, progress).map_err(|e| LoadError::Malformed {
        file: weights.describe(),
        reason: e.to_string(),
    })?;
    progress.finish();
    Ok(Box::new(model.with_vision(vision.map(|(encoder, _)| encoder))))
}

/// What a model is, read from its files without loading its weights (for listings).
#[derive(Clone, Debug)]
pub struct ModelSummary {
    /// `architectures[0]` (or GGUF's architecture).
    pub architecture: String,
    /// The family (`model_type`).
    pub model_type: String,
    /// Parameters in the weight files.
    pub num_params: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Format, dtype, size, digest of the weights.
    pub weights: crate::formats::weights::WeightsSummary,
}

/// Describes the model at `path` (a Hugging Face folder or a GGUF file) from its headers.
pub fn describe(path: &Path) -> Result<ModelSummary, LoadError> {
    let (cfg, num_params, weights) = if is_gguf(path) {
        let (store, cfg, _, summary) = open_gguf(path, &Device::Cpu)?;
        (cfg, store.num_params(), summary)
    } else {
        let (cfg, _, files, summary) = open_hf(path)?;
        (cfg, files.num_params(), summary)
    };
    Ok(ModelSummary {
        architecture: cfg.architectures.first().cloned().unwrap_or_default(),
        model_type: cfg.model_type.clone().unwrap_or_else(|| "llama".into()),
        num_params,
        max_position_embeddings: cfg.max_position_embeddings,
        weights,
    })
}

/// A Hugging Face folder's configuration (parsed and raw), weight files and their summary,
/// read from headers without loading any weight.
fn open_hf(
    dir: &Path,
) -> Result<
    (
        config::HfConfig,
        serde_json::Value,
        crate::formats::weights::WeightFiles,
        crate::formats::weights::WeightsSummary,
    ),
    LoadError,
> {
    let config_path = dir.join("config.json");
    let text = read_text(&config_path, "model configuration")?;
    let cfg = config::HfConfig::parse(&text, &config_path.display().to_string())?;
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let files = crate::formats::weights::WeightFiles::open(dir, raw.get("quantization").filter(|q| q.is_object()))?;
    let summary = files.summary(&text)?;
    Ok((cfg, raw, files, summary))
}

/// A GGUF file's store (for `device`, computing in f32), its configuration (parsed and as
/// config.json) and its summary.
fn open_gguf(
    path: &Path,
    device: &Device,
) -> Result<
    (
        std::sync::Arc<crate::formats::gguf::GgufStore>,
        config::HfConfig,
        serde_json::Value,
        crate::formats::weights::WeightsSummary,
    ),
    LoadError,
> {
    let store = std::sync::Arc::new(crate::formats::gguf::GgufStore::open(path, DType::F32, device)?);
    let raw = store.hf_config()?;
    let cfg: config::HfConfig = serde_json::from_value(raw.clone()).map_err(|e| LoadError::Malformed {
        file: path.display().to_string(),
        reason: format!("metadata does not describe a supported model: {e}"),
    })?;
    let summary = crate::formats::weights::WeightsSummary::of_gguf(path, &store).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((store, cfg, raw, summary))
}

fn load_gguf(
    path: &Path,
    mmproj: Option<&Path>,
    device: &Device,
    numerics: Numerics,
    progress: &LoadProgress,
) -> Result<Box<dyn Model>, LoadError> {
    let dtype = DType::F32;
    let (store, cfg, raw_config, summary) = open_gguf(path, device)?;
    let malformed = |e: candle_core::Error| LoadError::Malformed {
        file: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut model_config = model_config(&cfg, dtype, store.num_params(), summary, raw_config);
    let vision = mmproj
        .map(|mmproj| load_mmproj(mmproj, &store, cfg.hidden_size, device, numerics))
        .transpose()?;
    model_config.vision = vision.as_ref().map(|(_, facts)| facts.clone());
    let src = crate::formats::source::WeightSource::gguf(store.clone(), numerics);
    let mut spec = family_spec(&cfg, &src)?;
    // llama.cpp's conventions (see gguf.rs): permuted q/k for `llama`, Gemma norms with +1
    // baked in, Llama 3 scaling as divisors.
    spec.rope_interleaved = store.arch() == "llama";
    spec.norm_unit_offset = false;
    if let Some(divisors) = store.rope_freqs().map_err(malformed)? {
        spec.rope_full.scaling = config::RopeScaling::Divisors(divisors);
    }
    let model = decoder::Decoder::load(src, &spec, model_config, progress).map_err(malformed)?;
    progress.finish();
    Ok(Box::new(model.with_vision(vision.map(|(encoder, _)| encoder))))
}

/// The vision tower of an mmproj file (llama.cpp's `clip` GGUF) for the text model `text`:
/// Gemma 3's projector only; its soft tokens' ids come from the text model's vocabulary.
fn load_mmproj(
    path: &Path,
    text: &crate::formats::gguf::GgufStore,
    text_hidden: usize,
    device: &Device,
    numerics: Numerics,
) -> Result<(vision::VisionEncoder, vision::VisionFacts), LoadError> {
    let malformed = |reason: String| LoadError::Malformed {
        file: path.display().to_string(),
        reason,
    };
    let store = std::sync::Arc::new(crate::formats::gguf::GgufStore::open(path, DType::F32, device)?);
    let Some(config) = store.clip_config() else {
        return Err(LoadError::Unsupported(format!(
            "{}: the projector is not Gemma 3's (architecture `{}`; supported: clip files of projector type gemma3)",
            path.display(),
            store.arch()
        )));
    };
    if text.arch() != "gemma3" {
        return Err(LoadError::Unsupported(format!(
            "{}: a Gemma 3 projector needs a gemma3 model, not `{}`",
            path.display(),
            text.arch()
        )));
    }
    let token = |t: &str| {
        text.token_id(t)
            .ok_or_else(|| malformed(format!("the model's vocabulary has no `{t}` for images")))
    };
    let weights = crate::formats::source::WeightSource::gguf(store.clone(), numerics);
    let source = vision::Gemma3Vision {
        weights: &weights,
        config: &config,
        normalization: vision::normalization(&config)?,
        tokens: [
            token("<image_soft_token>")?,
            token("<start_of_image>")?,
            token("<end_of_image>")?,
        ],
        norm_unit_offset: false,
    };
    vision::VisionEncoder::load_gemma3(&source, text_hidden)?
        .ok_or_else(|| malformed("no vision tower (v.patch_embd.weight)".into()))
}

fn model_config(
    cfg: &config::HfConfig,
    dtype: DType,
    num_params: usize,
    weights: crate::formats::weights::WeightsSummary,
    hf_config: serde_json::Value,
) -> ModelConfig {
    ModelConfig {
        architecture: cfg
            .architectures
            .first()
            .cloned()
            .or_else(|| cfg.model_type.clone())
            .unwrap_or_default(),
        hidden_size: cfg.hidden_size,
        num_layers: cfg.num_hidden_layers,
        num_kv_heads: cfg.num_kv_heads(),
        head_dim: cfg.head_dim(),
        kv_widths: Vec::new(),
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        num_params,
        dtype,
        eos_token_ids: crate::formats::token_ids(cfg.eos_token_id.as_ref()),
        model_type: cfg.model_type.clone().unwrap_or_else(|| "llama".into()),
        weights,
        hf_config,
        vision: None,
    }
}

/// The decoder spec of a config's architecture.
fn family_spec(
    cfg: &config::HfConfig,
    src: &crate::formats::source::WeightSource,
) -> Result<decoder::DecoderSpec, LoadError> {
    let arch = cfg
        .architectures
        .first()
        .cloned()
        .or_else(|| cfg.model_type.clone())
        .unwrap_or_default();
    match arch.as_str() {
        "LlamaForCausalLM"
        | "MistralForCausalLM"
        | "MixtralForCausalLM"
        | "Qwen2ForCausalLM"
        | "Qwen3ForCausalLM"
        | "Qwen3MoeForCausalLM" => llama::spec(cfg, cfg.model_type.as_deref().unwrap_or("llama")),
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => gemma3::spec(cfg, src),
        "Gemma4ForCausalLM" | "Gemma4ForConditionalGeneration" => gemma4::spec(cfg, src),
        "Phi3ForCausalLM" => phi3::spec(cfg),
        "GptOssForCausalLM" => gpt_oss::spec(cfg),
        other => Err(LoadError::Unsupported(format!(
            "architecture `{other}` (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        ))),
    }
}

/// Weight formats mlxd reads, for error messages.
const SUPPORTED_WEIGHTS: &str = "f32/f16/bf16 safetensors, MLX affine-quantized safetensors (2/3/4/5/6/8-bit) \
     and MLX mxfp4, gpt-oss's MXFP4 experts (`quant_method` mxfp4)";

/// Rejects quantization schemes mlxd cannot compute, naming the scheme and what is supported.
fn check_quantization_supported(config: &serde_json::Value) -> Result<(), LoadError> {
    if let Some(mode) = config["quantization"]["mode"]
        .as_str()
        .filter(|m| !["affine", "mxfp4"].contains(m))
    {
        return Err(LoadError::Unsupported(format!(
            "MLX quantization mode `{mode}` (supported: {SUPPORTED_WEIGHTS})"
        )));
    }
    let hf_method = config["quantization_config"]["quant_method"].as_str();
    // transformers writes MXFP4 for gpt-oss only (its experts' `_blocks`/`_scales`).
    let gpt_oss_mxfp4 = hf_method == Some("mxfp4") && config["model_type"] == "gpt_oss";
    if let Some(method) = hf_method.filter(|_| config.get("quantization").is_none() && !gpt_oss_mxfp4) {
        return Err(LoadError::Unsupported(format!(
            "quantization method `{method}` (supported: {SUPPORTED_WEIGHTS})"
        )));
    }
    Ok(())
}

/// "260K", "494.0M", "1.2B": parameter counts as model cards and Ollama write them.
pub fn parameter_size(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{}K", n / 1000),
        n => n.to_string(),
    }
}
