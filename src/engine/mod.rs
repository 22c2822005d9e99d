//! The engine: one OS thread that owns device, weights and KV memory, reached only through
//! channels. `EngineHandle` is the cheap, cloneable async-side face of it.
//!
//! Requests go in over an unbounded command channel (synchronous `send` from handlers); each
//! request gets its own unbounded event channel back, so the engine never blocks on a slow
//! client. Dropping a `GenerationStream` closes that channel and the engine frees the sequence
//! at its next step. The engine accepts only `ValidatedRequest`s (see `crate::request`).

mod batch;
mod core;
pub mod error;
mod graphs;
mod images;
pub mod kv_disk;
pub mod metrics;
pub mod output;
mod pooling;
mod prompt_logprobs;
pub mod sampler;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{DType, Device};

use crate::device::DeviceChoice;
use tokio::sync::mpsc;

use crate::models::Model;
use crate::request::{ImageProcessor, RequestId, RequestLimits, ValidatedRequest};
use crate::text::TextCodec;

/// Most images one request may carry: each is decoded and kept as f32 pixels until its step
/// (a 896² image is 9.6 MB), and llama-server and Ollama set no lower limit in practice.
pub const MAX_IMAGES_PER_REQUEST: usize = 16;
pub use error::EngineError;
pub use output::{Logprobs, TokenEvent, TokenLogprob};

/// Builds the model on the engine thread, on the engine's device. `EngineHandle::spawn` loads
/// `EngineConfig::model_path`; tests pass their own to wrap a model (fault injection).
pub type ModelLoader = Box<dyn FnOnce(&EngineConfig, &Device) -> Result<Box<dyn Model>, EngineError> + Send>;

/// Everything the engine needs to start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Hugging Face model folder or GGUF file.
    pub model_path: PathBuf,
    /// A GGUF model's vision tower (llama.cpp's mmproj file), if it takes images.
    pub mmproj: Option<PathBuf>,
    /// The device the engine thread opens and owns.
    pub device: DeviceChoice,
    /// Compute dtype; None = the device's default (f32 on CPU, bf16 on GPU).
    pub dtype: Option<DType>,
    /// KV cache dtype; None = the compute dtype, except f16 on the CPU for weights that are
    /// not f32.
    pub kv_dtype: Option<DType>,
    /// KV memory budget in bytes; None = automatic (a share of free RAM on the CPU, of free
    /// device memory after the weights on a GPU).
    pub kv_memory_bytes: Option<u64>,
    /// On a GPU with an automatic KV budget: the share of total device memory mlxd may use
    /// (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences running at once; None = the device's default (64 CPU, 256 GPU).
    pub max_num_seqs: Option<usize>,
    /// Most tokens per forward pass; None = the device's default (512 CPU, 4096 GPU).
    pub max_num_batched_tokens: Option<usize>,
    /// Cap on the context length (None = the model's own).
    pub max_model_len: Option<usize>,
    /// Most tokens a reply generates when its request sets no limit (None: up to the
    /// context's end), as llama-server's `--n-predict`.
    pub default_max_tokens: Option<usize>,
    /// Reuse KV blocks of identical prompt prefixes.
    pub enable_prefix_cache: bool,
    /// Every request's numbers independent of the batch it runs in (`Numerics::BatchInvariant`;
    /// `--deterministic`): the same prompt, seed and settings give the same tokens and
    /// logprobs alone or among others, after preemption, with or without a prefix hit.
    pub deterministic: bool,
    /// Draw a progress bar while loading (only on a terminal).
    pub show_progress: bool,
    /// Fail requests that wait longer than this before being scheduled (None = never).
    pub queue_timeout: Option<std::time::Duration>,
    /// On a CUDA device: replay decode steps from captured CUDA graphs (vLLM's default; its
    /// `--enforce-eager` turns them off).
    pub cuda_graphs: bool,
    /// Write full prefix-cache blocks through to this directory and read them back on a miss
    /// (None: the prefix cache lives in memory only).
    pub kv_disk: Option<kv_disk::KvDiskConfig>,
}

impl ModelInfo {
    /// What every request is validated against, for the model served as `name`; `codec`
    /// knows the ids that end generation and the text of the image tokens.
    pub fn request_limits(&self, name: &str, codec: &TextCodec) -> RequestLimits {
        let vision = self.model.vision.as_ref().map(|v| {
            let text = |id: u32| codec.token_text(id).unwrap_or_default();
            let marker = text(v.begin_token_id);
            let expansion = format!(
                "{pad}{marker}{}{}{pad}",
                text(v.image_token_id).repeat(v.tokens_per_image),
                text(v.end_token_id),
                pad = v.padding,
            );
            Arc::new(ImageProcessor {
                size: v.image_size,
                mean: v.mean,
                std: v.std,
                rescale: v.rescale,
                tokens_per_image: v.tokens_per_image,
                image_token: v.image_token_id,
                marker,
                expansion,
                max_images: MAX_IMAGES_PER_REQUEST,
            })
        });
        RequestLimits {
            model: name.to_string(),
            vision,
            max_model_len: self.max_model_len,
            kv_pool_tokens: self.num_kv_blocks * self.block_size,
            block_size: self.block_size,
            vocab_size: self.model.vocab_size,
            eos_token_ids: codec.eos_ids().to_vec(),
            default_max_tokens: self.default_max_tokens,
        }
    }
}

/// What the server needs to know about the loaded model and the KV pool.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model's architecture facts (family, sizes, dtype, weights summary).
    pub model: crate::models::ModelConfig,
    /// Longest prompt + output the engine accepts.
    pub max_model_len: usize,
    /// Usable KV blocks.
    pub num_kv_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of KV memory allocated.
    pub kv_memory_bytes: u64,
    /// Element type of the KV cache.
    pub kv_dtype: DType,
    /// The device the engine computes on (`cpu`, `cuda:0`, ...).
    pub device: String,
    /// Most tokens per forward pass.
    pub max_num_batched_tokens: usize,
    /// Most sequences decoded together.
    pub max_num_seqs: usize,
    /// Most tokens a reply generates when its request sets no limit (None: the context's end).
    pub default_max_tokens: Option<usize>,
    /// The prefix cache has a disk tier (`--kv-disk`): prompts can be pinned.
    pub kv_disk: bool,
}

/// Live counters the engine publishes after every step (metrics, health, tests).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences running.
    pub num_running: AtomicUsize,
    /// Sequences waiting.
    pub num_waiting: AtomicUsize,
    /// Free KV blocks (usable ones, cached-but-free included).
    pub kv_blocks_free: AtomicUsize,
    /// Usable KV blocks.
    pub kv_blocks_total: AtomicUsize,
    /// Preemptions since start.
    pub num_preemptions: AtomicU64,
    /// Requests cancelled before they finished (client gone).
    pub num_aborted: AtomicU64,
    /// Engine steps that failed (their requests failed; the engine went on).
    pub num_failed_steps: AtomicU64,
    /// Most sequences ever scheduled together in one step.
    pub peak_batch_seqs: AtomicUsize,
    /// False once the engine thread stopped.
    pub healthy: AtomicBool,
}

pub(crate) enum EngineCommand {
    /// A new request and the channel its events go to.
    Add {
        id: RequestId,
        request: Box<ValidatedRequest>,
        reply: mpsc::UnboundedSender<TokenEvent>,
    },
    /// The text stage matched a stop string after `completion_tokens` tokens: finish the
    /// request with reason `stop` and report its usage.
    Stop { id: RequestId, completion_tokens: u32 },
    /// Blocks of a waiting request's prefix, read back from the disk cache (the leading ones
    /// that were there), with their contents.
    BlocksLoaded {
        id: RequestId,
        blocks: Vec<(crate::scheduler::kv::BlockHash, Vec<u8>)>,
    },
    /// Pin (or unpin) on disk the full blocks of `prompt` (see `EngineHandle::pin`).
    Pin {
        prompt: Vec<u32>,
        pin: bool,
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    },
    /// Fail what is in flight and end the thread.
    Shutdown,
}

/// Cloneable handle to the engine thread.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<EngineCommand>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    metrics: Arc<metrics::EngineMetrics>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for EngineCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineCommand::Add { id, .. } => write!(f, "Add({id})"),
            EngineCommand::Stop { id, .. } => write!(f, "Stop({id})"),
            EngineCommand::BlocksLoaded { id, blocks } => write!(f, "BlocksLoaded({id}, {})", blocks.len()),
            EngineCommand::Pin { prompt, pin, .. } => write!(f, "Pin({} tokens, {pin})", prompt.len()),
            EngineCommand::Shutdown => write!(f, "Shutdown"),
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread, loads the model and sizes the KV pool on it, and returns
    /// once it is ready (or failed to load).
    pub fn spawn(cfg: EngineConfig) -> Result<(Self, JoinHandle<()>), EngineError> {
        Self::spawn_with(cfg, Box::new(core::load_model))
    }

    /// Like `spawn`, with the model built by `loader` on the engine thread.
    pub fn spawn_with(cfg: EngineConfig, loader: ModelLoader) -> Result<(Self, JoinHandle<()>), EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let metrics = Arc::new(metrics::EngineMetrics::new());
        let thread_metrics = metrics.clone();
        let prefix_caching = cfg.enable_prefix_cache;
        let disk_tx = tx.clone();
        let join = std::thread::Builder::new()
            .name("mlxd-engine".into())
            .spawn(
                move || match core::EngineCore::load(&cfg, loader, thread_stats, thread_metrics) {
                    Ok((mut core, info)) => {
                        if let Some(disk) = &cfg.kv_disk {
                            core.attach_disk(disk, disk_tx);
                        }
                        let _ = ready_tx.send(Ok(info));
                        core.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| EngineError::Load(format!("cannot start engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Unavailable)??;
        metrics.describe_cache(
            info.block_size,
            info.num_kv_blocks,
            info.kv_dtype.as_str(),
            prefix_caching,
        );
        stats.healthy.store(true, Ordering::Relaxed);
        Ok((
            Self {
                tx,
                info: Arc::new(info),
                stats,
                metrics,
                next_id: Arc::new(AtomicU64::new(1)),
            },
            join,
        ))
    }

    /// Pins (or unpins) the full KV blocks of `prompt` in the disk cache: pinned blocks are
    /// never evicted for room, and outlive restarts. Blocks must have been computed (and so
    /// written through) before; the answer is how many of the prompt's full blocks are on disk.
    pub async fn pin(&self, prompt: Vec<u32>, pin: bool) -> Result<usize, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(EngineCommand::Pin { prompt, pin, reply })
            .map_err(|_| EngineError::Unavailable)?;
        rx.await
            .map_err(|_| EngineError::Unavailable)?
            .map_err(EngineError::StepFailed)
    }

    /// Queues a validated request; its tokens arrive on the returned stream.
    pub fn submit(&self, request: ValidatedRequest) -> Result<GenerationStream, EngineError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (reply, rx) = mpsc::unbounded_channel();
        self.tx
            .send(EngineCommand::Add {
                id,
                request: Box::new(request),
                reply,
            })
            .map_err(|_| EngineError::Unavailable)?;
        Ok(GenerationStream {
            id,
            rx,
            commands: self.tx.clone(),
        })
    }

    /// Asks the engine thread to stop after failing in-flight requests.
    pub fn shutdown(&self) {
        let _ = self.tx.send(EngineCommand::Shutdown);
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Prometheus metrics.
    pub fn metrics(&self) -> &metrics::EngineMetrics {
        &self.metrics
    }

    /// True while the engine thread is running.
    pub fn is_healthy(&self) -> bool {
        self.stats.healthy.load(Ordering::Relaxed) && !self.tx.is_closed()
    }
}

/// The token events of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<TokenEvent>,
    commands: mpsc::UnboundedSender<EngineCommand>,
}

impl GenerationStream {
    /// The next event, or None once the engine dropped the request.
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        self.rx.recv().await
    }

    /// Ends the request with reason `stop` after its first `completion_tokens` tokens (the
    /// text stage matched a stop string); a `Finished` event with the usage follows.
    pub fn stop(&self, completion_tokens: u32) {
        let _ = self.commands.send(EngineCommand::Stop {
            id: self.id,
            completion_tokens,
        });
    }
}
