//! Configuration: `config/mlxd.toml` (every knob, documented there), overlaid by CLI flags in
//! `main.rs`, validated once.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP side.
    pub server: ServerConfig,
    /// Model and memory.
    pub engine: EngineSection,
    /// Batching limits.
    pub scheduler: SchedulerSection,
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 = any free port).
    pub port: u16,
    /// Name the API reports for the model (default: the model folder's name).
    pub served_model_name: Option<String>,
    /// Seconds the first SIGINT/SIGTERM lets running requests finish before exiting.
    pub shutdown_timeout: f64,
    /// Largest request body accepted; larger ones get HTTP 413.
    pub max_body: String,
    /// Seconds a client may take to send a request's headers, or pause within its body.
    pub read_timeout: f64,
    /// API keys every route but /health and / requires (none: no key needed).
    pub api_keys: Vec<String>,
    /// A file with one API key per line (blank lines and `#` comments skipped).
    pub api_key_file: Option<PathBuf>,
    /// Serve /metrics without a key even when keys are required.
    pub metrics_public: bool,
    /// Browser origins allowed besides the local ones; "*" allows all.
    pub cors_origins: Vec<String>,
    /// What happens to a thinking model's thoughts unless a request says otherwise.
    pub reasoning_format: crate::text::ReasoningMode,
    /// How embeddings are pooled (None: what the model declares, else mean).
    pub pooling: Option<crate::request::Pooling>,
    /// How long a model stays loaded after a request ("5m", "1h", seconds; negative: for
    /// good; 0: unload when idle). Requests may set their own (`keep_alive`).
    pub keep_alive: String,
    /// Most models loaded at once; the least recently used idle one makes room (0: no limit).
    pub max_loaded_models: usize,
    /// A folder whose model folders and `.gguf` files can all be served.
    pub models_dir: Option<PathBuf>,
    /// The Ollama store to serve from (default: `OLLAMA_MODELS` or `~/.ollama/models`).
    pub ollama_models: Option<PathBuf>,
    /// The Hugging Face hub cache to serve from (default: `HF_HUB_CACHE`, `HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`).
    pub hf_cache: Option<PathBuf>,
    /// Serve the chat page at `/` to browsers.
    pub ui: bool,
    /// Keep OpenAI's context rules: a prompt plus `max_tokens` beyond the context, and a chat
    /// completion's conversation that does not fit, are 400s (by default the reply ends at the
    /// context's end with `length`, and the conversation is fitted as Ollama fits it).
    pub strict_context: bool,
    /// Fetch requests' `http(s)` image URLs: None never (only base64 `data:` URLs), an empty
    /// list from any public address, or these hosts only (which may be private: an image store
    /// on the operator's network).
    pub allow_image_urls: Option<Vec<String>>,
    /// Most Responses API responses kept for `previous_response_id` (0: none are stored).
    pub responses_max_count: usize,
    /// Most memory they may hold (JSON bytes), e.g. "256MiB".
    pub responses_max_size: String,
    /// Seconds a stored response is kept.
    pub responses_ttl: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            served_model_name: None,
            shutdown_timeout: 30.0,
            max_body: "32MiB".into(),
            read_timeout: 30.0,
            api_keys: Vec::new(),
            api_key_file: None,
            metrics_public: false,
            cors_origins: Vec::new(),
            reasoning_format: crate::text::ReasoningMode::Separate,
            pooling: None,
            keep_alive: "5m".into(),
            max_loaded_models: 3,
            models_dir: None,
            ollama_models: None,
            hf_cache: None,
            ui: true,
            strict_context: false,
            allow_image_urls: None,
            responses_max_count: 1000,
            responses_max_size: "256MiB".into(),
            responses_ttl: 86400.0,
        }
    }
}

/// `[engine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// Model folder.
    pub model: Option<PathBuf>,
    /// A GGUF model's vision tower: llama.cpp's mmproj file (for `model`, the first model).
    pub mmproj: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda, cuda:N, metal.
    pub device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on GPU), f32, f16 or bf16.
    pub dtype: String,
    /// KV cache dtype: auto (the compute dtype; f16 on the CPU for weights that are not f32),
    /// f32, f16 or bf16.
    pub kv_dtype: String,
    /// With an automatic KV budget on a GPU: the share of device memory mlxd may use.
    pub gpu_memory_utilization: f64,
    /// KV budget: "auto" or a size such as "512MiB", "2GiB", "1000000".
    pub kv_memory: String,
    /// Reuse KV of identical prompt prefixes.
    pub prefix_cache: bool,
    /// Cap on prompt + output tokens (0 = the model's context length).
    pub max_model_len: usize,
    /// Most tokens a reply generates when its request sets no limit (0: the context's end).
    pub default_max_tokens: usize,
    /// On a CUDA GPU, replay decode steps from captured CUDA graphs.
    pub cuda_graphs: bool,
    /// Every request's tokens and logprobs independent of what else the server runs
    /// (batch-invariant kernels; the CPU in f32 for now).
    pub deterministic: bool,
    /// A directory the prefix cache's full KV blocks are written through to, and read back
    /// from after eviction or a restart (None: memory only).
    pub kv_disk: Option<PathBuf>,
    /// Most bytes `kv_disk` may hold (oldest blocks first out).
    pub kv_disk_size: String,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            model: None,
            mmproj: None,
            device: "auto".into(),
            dtype: "auto".into(),
            kv_dtype: "auto".into(),
            gpu_memory_utilization: 0.9,
            kv_memory: "auto".into(),
            prefix_cache: true,
            max_model_len: 0,
            default_max_tokens: 0,
            cuda_graphs: true,
            deterministic: false,
            kv_disk: None,
            kv_disk_size: "10GiB".into(),
        }
    }
}

/// `[scheduler]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Most sequences running at once; 0 = the device's default (64 CPU, 256 GPU).
    pub max_seqs: usize,
    /// Most tokens in one forward pass; 0 = the device's default (512 CPU, 4096 GPU).
    pub max_batch_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most requests queued beyond the running ones; more get 429 at once.
    pub max_queue: usize,
    /// Seconds a request may wait in the queue before it fails (0 = forever).
    pub queue_timeout: f64,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            max_seqs: 0,
            max_batch_tokens: 0,
            block_size: 16,
            max_queue: 256,
            queue_timeout: 300.0,
        }
    }
}

/// A configuration value that is out of range or unparsable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Checks every value once, after overlays.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::request::KeepAlive::parse(&serde_json::Value::String(self.server.keep_alive.clone()))
            .map_err(|e| ConfigError(format!("keep_alive {e}")))?;
        self.kv_disk()?;
        self.engine
            .device
            .parse::<crate::device::DeviceChoice>()
            .map_err(|e| ConfigError(e.to_string()))?;
        let u = self.engine.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(ConfigError(format!(
                "gpu_memory_utilization must be in (0, 1], got {u}"
            )));
        }
        for (name, value) in [("dtype", &self.engine.dtype), ("kv_dtype", &self.engine.kv_dtype)] {
            if value != "auto" && crate::device::parse_dtype(value).is_none() {
                return Err(ConfigError(format!("{name} `{value}` (use auto, f32, f16 or bf16)")));
            }
        }
        parse_kv_memory(&self.engine.kv_memory)?;
        let s = &self.scheduler;
        if s.block_size == 0 {
            return Err(ConfigError("block_size must be positive".into()));
        }
        let t = self.server.shutdown_timeout;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(ConfigError(
                "shutdown_timeout must be a non-negative number of seconds".into(),
            ));
        }
        self.max_body_bytes()?;
        self.responses_max_bytes()?;
        let ttl = self.server.responses_ttl;
        if !(ttl > 0.0 && ttl.is_finite()) {
            return Err(ConfigError("responses_ttl must be a positive number of seconds".into()));
        }
        let r = self.server.read_timeout;
        if !(r > 0.0 && r.is_finite()) {
            return Err(ConfigError("read_timeout must be a positive number of seconds".into()));
        }
        if !(s.queue_timeout >= 0.0 && s.queue_timeout.is_finite()) {
            return Err(ConfigError(
                "queue_timeout must be a non-negative number of seconds".into(),
            ));
        }
        if s.max_batch_tokens != 0 && s.max_seqs != 0 && s.max_batch_tokens < s.max_seqs {
            return Err(ConfigError(
                "max_batch_tokens must be at least max_seqs (one decode token each)".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Every API key: the listed ones and those of `api_key_file`.
    pub fn api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut keys: Vec<String> = self.server.api_keys.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(path) = &self.server.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("api_key_file {}: {e}", path.display())))?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
            if keys.len() == before {
                return Err(ConfigError(format!("api_key_file {} holds no key", path.display())));
            }
        }
        Ok(keys)
    }

    /// `[server] max_body` in bytes.
    pub fn max_body_bytes(&self) -> Result<usize, ConfigError> {
        let spec = &self.server.max_body;
        parse_size(spec)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ConfigError(format!("max_body `{spec}` (use a size like 32MiB)")))
    }

    /// `[server] responses_max_size` in bytes (the Responses API's store budget).
    pub fn responses_max_bytes(&self) -> Result<usize, ConfigError> {
        let spec = &self.server.responses_max_size;
        parse_size(spec)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ConfigError(format!("responses_max_size `{spec}` (use a size like 256MiB)")))
    }

    /// The disk tier of the prefix cache, when `kv_disk` names a directory.
    pub fn kv_disk(&self) -> Result<Option<crate::engine::kv_disk::KvDiskConfig>, ConfigError> {
        let Some(dir) = &self.engine.kv_disk else {
            return Ok(None);
        };
        let spec = &self.engine.kv_disk_size;
        let max_bytes =
            parse_size(spec).ok_or_else(|| ConfigError(format!("kv_disk_size `{spec}` (use a size like 10GiB)")))?;
        Ok(Some(crate::engine::kv_disk::KvDiskConfig {
            dir: dir.clone(),
            max_bytes,
        }))
    }
}

/// Resolves a KV budget: `auto` (a fraction of available RAM) or an explicit size.
/// None means automatic: the engine sizes the pool (`engine::core::kv_budget`).
pub fn parse_kv_memory(spec: &str) -> Result<Option<u64>, ConfigError> {
    if spec.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    parse_size(spec)
        .map(Some)
        .ok_or_else(|| ConfigError(format!("kv_memory `{spec}` (use auto, or a size like 512MiB or 2GiB)")))
}

/// Parses `123`, `64K`, `512MiB`, `2GB`, `1.5GiB` (K/M/G are powers of 1024 either way).
pub fn parse_size(spec: &str) -> Option<u64> {
    let s = spec.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    (value >= 0.0).then_some((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("12 parsecs"), None);
    }

    #[test]
    fn the_shipped_config_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mlxd.toml");
        let cfg = Config::from_file(&path).expect("config/mlxd.toml parses");
        let defaults = Config::default();
        assert_eq!(cfg.server.port, defaults.server.port);
        assert_eq!(cfg.server.shutdown_timeout, defaults.server.shutdown_timeout);
        assert_eq!(cfg.server.max_body, defaults.server.max_body);
        assert_eq!(cfg.server.read_timeout, defaults.server.read_timeout);
        assert_eq!(cfg.server.metrics_public, defaults.server.metrics_public);
        assert_eq!(cfg.scheduler.max_seqs, defaults.scheduler.max_seqs);
        assert_eq!(cfg.scheduler.max_batch_tokens, defaults.scheduler.max_batch_tokens);
        assert_eq!(cfg.engine.kv_memory, defaults.engine.kv_memory);
        assert_eq!(cfg.engine.device, defaults.engine.device);
        assert_eq!(cfg.engine.dtype, defaults.engine.dtype);
        assert_eq!(cfg.engine.kv_dtype, defaults.engine.kv_dtype);
        assert_eq!(cfg.engine.cuda_graphs, defaults.engine.cuda_graphs);
        assert_eq!(
            cfg.engine.gpu_memory_utilization,
            defaults.engine.gpu_memory_utilization
        );
        assert_eq!(cfg.scheduler.max_queue, defaults.scheduler.max_queue);
        assert_eq!(cfg.scheduler.queue_timeout, defaults.scheduler.queue_timeout);
    }
}
