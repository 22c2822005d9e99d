//! Model families on candle tensors, weight loading and the forward contract the engine uses.
//!
//! Owner: the engine thread. Models are stateless (`&self`): KV lives in `PagedKvCache` and
//! positions come from `BatchInput`, so one model serves any mix of sequences.

pub mod config;
pub mod decoder;
pub mod gemma3;
pub mod llama;
pub mod phi3;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use crate::compute::batch::{BatchInput, FixedDecode};
pub use crate::compute::paged_kv::{KvLayout, PagedKvCache};

/// Why a model folder could not be loaded; every variant names the file or feature involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is absent.
    #[error("{path}: file not found ({what})")]
    Missing {
        /// The path looked for.
        path: PathBuf,
        /// What the file is for.
        what: String,
    },
    /// A file exists but cannot be parsed or is inconsistent.
    #[error("{file}: {reason}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The model uses something mlxd does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Architecture facts the engine and server need, independent of the family.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `architectures[0]` from config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// Width of the hidden states (the size of an embedding).
    pub hidden_size: usize,
    /// Decoder layers (each keeps KV).
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
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
}

/// Reports load progress (a terminal bar when stderr is a TTY, nothing otherwise).
pub struct LoadProgress {
    bar: indicatif::ProgressBar,
}

impl LoadProgress {
    /// A progress reporter drawing to stderr only when it is a terminal.
    pub fn stderr() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("loading layers {bar:30} {pos}/{len}") {
            bar.set_style(style);
        }
        Self { bar }
    }

    /// A reporter that draws nothing (tests).
    pub fn hidden() -> Self {
        Self {
            bar: indicatif::ProgressBar::hidden(),
        }
    }

    fn set_length(&self, n: u64) {
        self.bar.set_length(n);
    }

    fn inc(&self) {
        self.bar.inc(1);
    }

    /// Removes the bar once loading is done.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `architectures[0]` values mlxd can load.
pub const SUPPORTED_ARCHITECTURES: [&str; 7] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM",
];

/// Loads a model: a Hugging Face folder, or a `.gguf` file, onto `device`, computing in
/// `dtype` (GGUF models compute in f32).
pub fn load(path: &Path, device: &Device, dtype: DType, progress: &LoadProgress) -> Result<Box<dyn Model>, LoadError> {
    if is_gguf(path) {
        return load_gguf(path, device, progress);
    }
    let (cfg, raw_config, weights, summary) = open_hf(path)?;
    check_quantization_supported(&raw_config)?;
    let model_config = model_config(&cfg, dtype, weights.num_params(), summary, raw_config);
    let vb = crate::formats::source::WeightSource::Hf(weights.var_builder(dtype, device)?);
    let spec = family_spec(&cfg, &vb)?;
    let model = decoder::Decoder::load(vb, &spec, model_config, progress).map_err(|e| LoadError::Malformed {
        file: weights.describe(),
        reason: e.to_string(),
    })?;
    progress.finish();
    Ok(Box::new(model))
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

/// True when tensors on `device` go through mlxd's own fused CUDA kernels (`models::cuda`)
/// instead of chains of candle ops: a CUDA device in a `cuda` build.
pub fn runs_kernels(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// True for a path that names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    // Ollama's blobs have no extension: the magic says.
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
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

fn load_gguf(path: &Path, device: &Device, progress: &LoadProgress) -> Result<Box<dyn Model>, LoadError> {
    let dtype = DType::F32;
    let (store, cfg, raw_config, summary) = open_gguf(path, device)?;
    let malformed = |e: candle_core::Error| LoadError::Malformed {
        file: path.display().to_string(),
        reason: e.to_string(),
    };
    let model_config = model_config(&cfg, dtype, store.num_params(), summary, raw_config);
    let src = crate::formats::source::WeightSource::Gguf {
        store: store.clone(),
        path: String::new(),
    };
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
    Ok(Box::new(model))
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
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        num_params,
        dtype,
        eos_token_ids: config::token_ids(cfg.eos_token_id.as_ref()),
        model_type: cfg.model_type.clone().unwrap_or_else(|| "llama".into()),
        weights,
        hf_config,
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
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM" => {
            llama::spec(cfg, cfg.model_type.as_deref().unwrap_or("llama"))
        }
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => gemma3::spec(cfg, src),
        "Phi3ForCausalLM" => phi3::spec(cfg),
        other => Err(LoadError::Unsupported(format!(
            "architecture `{other}` (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        ))),
    }
}

/// Weight formats mlxd reads, for error messages.
const SUPPORTED_WEIGHTS: &str = "f32/f16/bf16 safetensors, MLX affine-quantized safetensors (2/3/4/5/6/8-bit)";

/// Rejects quantization schemes mlxd cannot compute, naming the scheme and what is supported.
fn check_quantization_supported(config: &serde_json::Value) -> Result<(), LoadError> {
    if let Some(mode) = config["quantization"]["mode"].as_str().filter(|m| *m != "affine") {
        return Err(LoadError::Unsupported(format!(
            "MLX quantization mode `{mode}` (supported: {SUPPORTED_WEIGHTS})"
        )));
    }
    let hf_method = config["quantization_config"]["quant_method"].as_str();
    if let Some(method) = hf_method.filter(|_| config.get("quantization").is_none()) {
        return Err(LoadError::Unsupported(format!(
            "quantization method `{method}` (supported: {SUPPORTED_WEIGHTS})"
        )));
    }
    Ok(())
}

/// Reads a UTF-8 file, naming it and its role on failure.
pub fn read_text(path: &Path, what: &str) -> Result<String, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LoadError::Missing {
            path: path.to_path_buf(),
            what: what.to_string(),
        }),
        Err(source) => Err(LoadError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
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

/// Parses a dtype name as used on the command line and in config files.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}
