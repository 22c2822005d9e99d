//! The engine loop: the only owner of the device, the model, the KV memory and the scheduler.
//!
//! Owner thread: "mlxd-engine". Each step: drain commands, drop sequences whose client left,
//! schedule, run ONE forward over every scheduled token, sample, update, send events.
//!
//! [INV_STEP_ISOLATION] An error or a panic inside a step fails only the requests scheduled in
//! that step (their blocks are freed) and the loop goes on; if even that cleanup panics, the
//! scheduler is rebuilt empty and every request in flight fails. No request stops the thread.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};

use super::batch::HostBatch;
use super::graphs::DecodeGraphs;
use super::images::ImagePlan;
use super::kv_disk::{DiskCache, KvDiskConfig, StoreIdentity};
use super::metrics::EngineMetrics;
use super::output::TokenEvent;
use super::pooling::{PoolPlan, Pooled};
use super::prompt_logprobs::PromptRows;
use super::sampler::SamplerState;
use super::{EngineCommand, EngineConfig, EngineError, EngineStats, ModelInfo, ModelLoader};
use crate::compute::batch::ImageRows;
use crate::compute::paged_kv::{KvLayout, PagedKvCache};
use crate::compute::Numerics;
use crate::formats::LoadProgress;
use crate::models::{self, Model, ModelConfig};
use crate::request::{FinishReason, PromptImage, RequestId, Usage, ValidatedRequest};
use crate::scheduler::kv::block_hash::extend_block_hashes;
use crate::scheduler::kv::{BlockHash, BlockManager};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput, Sequence, SequenceSpec, StepResult};
use crate::text::Constraint;

/// The engine's part of a live request's record (the scheduler holds the `Sequence` beside it).
/// One step's masks of the constrained rows, and the requests whose constraint broke.
type ConstraintMasks = (Vec<Option<Vec<u32>>>, Vec<(RequestId, String)>);

struct RequestState {
    reply: UnboundedSender<TokenEvent>,
    sampler: SamplerState,
    /// The output constraint, following every token emitted.
    constraint: Option<Constraint>,
    /// An embedding request's pool (prefill only, no token sampled).
    embedding: Option<Pooled>,
    /// Alternatives reported with each prompt token's logprob (None: no prompt logprobs).
    prompt_logprobs: Option<u8>,
    /// Prompt tokens whose KV was read back from the disk cache for this request.
    disk_hit_tokens: u32,
    /// The prompt's images (their soft tokens are encoded in the steps that feed them).
    images: Vec<PromptImage>,
    usage: Usage,
    arrived_at: Instant,
    first_scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// Most prompt tokens of a request with prompt logprobs fed in one step: its logits rows (one
/// vocabulary of floats each, 600 KB for a 150K vocabulary) stay bounded per step.
const PROMPT_LOGPROBS_CHUNK: usize = 256;

/// Everything the engine thread owns.
pub(crate) struct EngineCore {
    model: Box<dyn Model>,
    kv: PagedKvCache,
    scheduler: Scheduler<RequestState>,
    scheduler_cfg: SchedulerConfig,
    prefix_cache: bool,
    device: Device,
    stats: Arc<EngineStats>,
    metrics: Arc<EngineMetrics>,
    queue_timeout: Option<Duration>,
    cache_salt: u64,
    /// Requests of the step in progress: the ones a failing step fails.
    step_ids: Vec<RequestId>,
    /// Decode steps replayed from CUDA graphs (None: every step runs eagerly).
    graphs: Option<DecodeGraphs>,
    /// The prefix cache's disk tier (None: memory only).
    disk: Option<DiskCache>,
    /// Requests waiting for prefix blocks to come back from disk, outside the scheduler.
    loading: HashMap<RequestId, (Sequence, RequestState)>,
}

/// Device memory kept free for activations, logits and the allocator's slack when the KV
/// budget is automatic.
const ACTIVATION_RESERVE_BYTES: u64 = 2 << 30;

/// The default `ModelLoader`: the model at `cfg.model_path`.
pub(crate) fn load_model(cfg: &EngineConfig, device: &Device) -> Result<Box<dyn Model>, EngineError> {
    let progress = if cfg.show_progress {
        LoadProgress::stderr()
    } else {
        LoadProgress::hidden()
    };
    let dtype = cfg.dtype.unwrap_or_else(|| crate::device::default_dtype(device));
    let numerics = numerics(cfg, device, dtype)?;
    models::load(
        &cfg.model_path,
        cfg.mmproj.as_deref(),
        device,
        dtype,
        numerics,
        &progress,
    )
    .map_err(|e| EngineError::Load(e.to_string()))
}

/// The numerics `--deterministic` asks for, where they are built: the CPU computing in f32
/// (its f32 panel kernel and per-row attention), and a GPU computing dense weights in bf16 or
/// f16 (the row-invariant matmul and the unsplit paged attention kernel). GGUF files on a GPU
/// go through candle's quantized kernels, which pick their method by the batch's size, so
/// asking there is a load error rather than a mode that is not what it says.
fn numerics(cfg: &EngineConfig, device: &Device, dtype: DType) -> Result<Numerics, EngineError> {
    if !cfg.deterministic {
        return Ok(Numerics::Fastest);
    }
    let refuse = |why: String| Err(EngineError::Load(format!("--deterministic: {why}")));
    if device.is_cpu() {
        if dtype != DType::F32 {
            return refuse(format!(
                "on the CPU it computes in f32, not {dtype:?} (leave --dtype at auto or set f32)"
            ));
        }
    } else if !crate::compute::fused::runs_kernels(device) {
        return refuse("it runs on the CPU or a CUDA GPU".into());
    } else if !gpu_deterministic_verified() {
        return refuse(
            "on a GPU it is opt-in (MLXD_CUDA_DETERMINISTIC=1) until scripts/test-gpu.sh deterministic has held \
             its kernels to the comparison on a GPU; use --device cpu"
                .into(),
        );
    } else if crate::formats::is_gguf(&cfg.model_path) {
        return refuse(
            "GGUF files on a GPU multiply through candle's quantized kernels, which are not batch invariant; \
             serve a Hugging Face or MLX folder, or use --device cpu"
                .into(),
        );
    } else if !matches!(dtype, DType::BF16 | DType::F16) {
        return refuse(format!("on a GPU it computes in bf16 or f16, not {dtype:?}"));
    }
    Ok(Numerics::BatchInvariant)
}

/// Whether a GPU takes `--deterministic`: only with `MLXD_CUDA_DETERMINISTIC=1` until
/// `scripts/test-gpu.sh deterministic` has run on a GPU (its kernels compile and follow the
/// CPU's design, but no device was lent in the session that wrote them).
fn gpu_deterministic_verified() -> bool {
    std::env::var_os("MLXD_CUDA_DETERMINISTIC").is_some_and(|v| v == "1")
}

/// Tokens per forward pass by default on the CPU. A step of N prompt tokens stalls every running
/// stream for the whole step: measured on the Qwen2.5-0.5B shape (2 cores), 256 prompt tokens
/// take 1.3 s and 1024 take 9 s, so 512 bounds the stall to a few seconds while keeping prefill
/// in efficient chunks.
const DEFAULT_MAX_BATCH_TOKENS_CPU: usize = 512;
/// Sequences decoded together by default on the CPU (each decode row costs a full pass over
/// the weights' bandwidth budget there) and on a GPU (vLLM's default).
const DEFAULT_MAX_SEQS_CPU: usize = 64;
/// See `DEFAULT_MAX_SEQS_CPU`.
const DEFAULT_MAX_SEQS_GPU: usize = 256;
/// The same on a GPU, where a step's cost grows slowly with its tokens: the H200 runs 256
/// streams of 200-token prompts with 4096 (TTFT p50 0.52 s for the 256).
const DEFAULT_MAX_BATCH_TOKENS_GPU: usize = 4096;

/// Share of available memory the KV pool takes with `kv_memory = "auto"`.
const AUTO_KV_FRACTION: f64 = 0.2;

/// The automatic KV budget in host memory: a share of the RAM available now.
fn auto_host_kv_bytes() -> u64 {
    let available = available_memory_bytes().unwrap_or(4 << 30);
    (available as f64 * AUTO_KV_FRACTION) as u64
}

/// `MemAvailable` from /proc/meminfo (Linux); None elsewhere.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The KV budget: as configured, or automatic once the weights are resident.
fn kv_budget(cfg: &EngineConfig, device: &Device) -> u64 {
    if let Some(bytes) = cfg.kv_memory_bytes {
        return bytes;
    }
    match crate::device::memory_info(device) {
        // What the utilization share leaves after everything already allocated (weights,
        // other processes), minus room for activations.
        Some((free, total)) => {
            let allowed = (total as f64 * cfg.gpu_memory_utilization) as u64;
            let used = total - free;
            allowed.saturating_sub(used).saturating_sub(ACTIVATION_RESERVE_BYTES)
        }
        None => auto_host_kv_bytes(),
    }
}

/// The KV cache's element type: the one asked for, else the compute dtype, except with f32
/// compute on the CPU of weights that are not f32 (quantized or half), where f16 KV (llama.cpp's
/// default) halves the KV memory and attention's reads for precision the weights never had.
/// A KV dtype other than the compute dtype works only there (the CPU attention widens it).
fn kv_dtype(asked: Option<DType>, device: &Device, mc: &ModelConfig) -> Result<DType, EngineError> {
    let widening = device.is_cpu() && mc.dtype == DType::F32;
    match asked {
        Some(d) if d != mc.dtype && !widening => Err(EngineError::Load(format!(
            "KV dtype {d:?} differs from the compute dtype {:?}: only f32 compute on the CPU reads \
             another KV dtype (leave --kv-dtype at auto, or set it to the compute dtype)",
            mc.dtype
        ))),
        Some(d) => Ok(d),
        None if widening && mc.weights.dtype != "F32" => Ok(DType::F16),
        None => Ok(mc.dtype),
    }
}

impl EngineCore {
    /// Loads the model, sizes and allocates the KV pool, and builds the scheduler.
    pub(crate) fn load(
        cfg: &EngineConfig,
        loader: ModelLoader,
        stats: Arc<EngineStats>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<(Self, ModelInfo), EngineError> {
        let device = cfg.device.open().map_err(|e| EngineError::Load(e.to_string()))?;
        let model = loader(cfg, &device)?;
        let mc = model.config().clone();
        let (default_seqs, default_tokens) = if device.is_cpu() {
            (DEFAULT_MAX_SEQS_CPU, DEFAULT_MAX_BATCH_TOKENS_CPU)
        } else {
            (DEFAULT_MAX_SEQS_GPU, DEFAULT_MAX_BATCH_TOKENS_GPU)
        };
        let max_num_seqs = cfg.max_num_seqs.unwrap_or(default_seqs);
        let mut max_num_batched_tokens = cfg.max_num_batched_tokens.unwrap_or(default_tokens);
        if let Some(tokens) = mc.vision.as_ref().map(|v| v.tokens_per_image) {
            // An image's soft tokens go through one step together (they attend to each other).
            if max_num_batched_tokens < tokens {
                tracing::warn!(
                    asked = max_num_batched_tokens,
                    tokens_per_image = tokens,
                    "raising the tokens per step to one image's soft tokens"
                );
                max_num_batched_tokens = tokens;
            }
        }
        let trained = mc.max_position_embeddings;
        if let Some(asked) = cfg.max_model_len.filter(|&m| m > trained) {
            // Never capped silently: positions past the trained length need rope scaling the
            // model's config does not declare.
            return Err(EngineError::Load(format!(
                "--max-model-len {asked} is longer than the model's trained context of {trained} tokens \
                 (max_position_embeddings in its config); ask for at most {trained}, or extend the \
                 context deliberately by giving config.json a rope_scaling (e.g. yarn) and a larger \
                 max_position_embeddings"
            )));
        }
        let max_model_len = cfg.max_model_len.unwrap_or(trained);
        let kv_dtype = kv_dtype(cfg.kv_dtype, &device, &mc)?;
        let layout = KvLayout {
            widths: mc.kv_widths.clone(),
            block_size: cfg.block_size,
            dtype: kv_dtype,
        };
        let kv_memory_bytes = kv_budget(cfg, &device);
        // +1: block 0 is the null block. Never more than every sequence at full length needs.
        let by_budget = (kv_memory_bytes / layout.bytes_per_block() as u64) as usize;
        let by_need = max_num_seqs * max_model_len.div_ceil(cfg.block_size) + 1;
        let num_blocks = by_budget.min(by_need);
        if num_blocks < 2 {
            return Err(EngineError::Load(format!(
                "KV memory of {} bytes holds no block of {} bytes; raise --kv-memory",
                kv_memory_bytes,
                layout.bytes_per_block()
            )));
        }
        let block_bytes = layout.bytes_per_block();
        let mut kv = PagedKvCache::new(layout, num_blocks, &device)?;
        let scheduler_cfg = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
        };
        let blocks = BlockManager::new(num_blocks, cfg.block_size, cfg.enable_prefix_cache);
        let scheduler = Scheduler::new(scheduler_cfg.clone(), blocks);
        stats.kv_blocks_total.store(num_blocks - 1, Ordering::Relaxed);
        let info = ModelInfo {
            model: mc,
            max_model_len,
            num_kv_blocks: num_blocks - 1,
            block_size: cfg.block_size,
            kv_memory_bytes: (num_blocks * block_bytes) as u64,
            kv_dtype,
            device: crate::device::describe(&device),
            max_num_batched_tokens,
            max_num_seqs,
            default_max_tokens: cfg.default_max_tokens,
            kv_disk: cfg.kv_disk.is_some(),
        };
        // Prefix-cache entries (in memory and on disk) are only valid for the same weights
        // computed the same way (dtypes, numerics), by the same version, in the same block
        // layout.
        let salt_source = format!(
            "{}|{:?}|{:?}|{}|{}|deterministic={}",
            info.model.weights.digest,
            info.model.dtype,
            kv_dtype,
            cfg.block_size,
            env!("CARGO_PKG_VERSION"),
            cfg.deterministic
        );
        let mut graphs = cfg
            .cuda_graphs
            .then(|| DecodeGraphs::new(&device, max_model_len))
            .flatten();
        if let Some(g) = &graphs {
            if let Err(e) = g.settle_scratch(model.as_ref(), &mut kv, max_num_batched_tokens, max_num_seqs) {
                tracing::warn!(error = %e, "warm-up steps failed; CUDA graphs are off, steps run eagerly");
                graphs = None;
            }
        }
        let core = Self {
            model,
            kv,
            scheduler,
            scheduler_cfg,
            prefix_cache: cfg.enable_prefix_cache,
            device,
            stats,
            metrics,
            queue_timeout: cfg.queue_timeout,
            cache_salt: xxhash_rust::xxh3::xxh3_64(salt_source.as_bytes()),
            step_ids: Vec::new(),
            graphs,
            disk: None,
            loading: HashMap::new(),
        };
        Ok((core, info))
    }

    /// Adds the disk tier: every block newly cached is written through, and prefixes found on
    /// disk are read back. Blocks are keyed by hashes salted with this engine's cache salt.
    pub(crate) fn attach_disk(&mut self, cfg: &KvDiskConfig, commands: UnboundedSender<EngineCommand>) {
        if !self.prefix_cache {
            tracing::warn!("--kv-disk needs the prefix cache; it is off, so the disk cache is too");
            return;
        }
        let identity = StoreIdentity {
            salt: self.cache_salt,
            block_bytes: self.kv.layout().bytes_per_block(),
        };
        self.disk = DiskCache::start(cfg, identity, commands, self.metrics.clone());
        if self.disk.is_some() {
            self.scheduler.blocks_mut().record_newly_cached();
        }
    }

    /// Serves commands until shutdown or until every handle is dropped.
    pub(crate) fn run(mut self, mut rx: UnboundedReceiver<EngineCommand>) {
        self.publish_stats();
        loop {
            if !self.scheduler.has_work() {
                match rx.blocking_recv() {
                    Some(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    None => break,
                }
            }
            if !self.drain_commands(&mut rx) {
                break;
            }
            self.abort_disconnected();
            self.expire_queued();
            if self.scheduler.has_work() {
                self.guarded_step();
            }
            self.publish_stats();
        }
        // Unhealthy before the clients hear of it: a client that reacts to the error by
        // probing /health must see 503.
        self.stats.healthy.store(false, Ordering::Relaxed);
        self.fail_all(EngineError::Unavailable);
        tracing::info!("engine stopped");
    }

    /// Applies every queued command; false means shut down.
    fn drain_commands(&mut self, rx: &mut UnboundedReceiver<EngineCommand>) -> bool {
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Applies one command; false means shut down.
    fn handle(&mut self, cmd: EngineCommand) -> bool {
        match cmd {
            EngineCommand::Add { id, request, reply } => self.add(id, *request, reply),
            EngineCommand::Stop { id, completion_tokens } => self.stop(id, completion_tokens),
            EngineCommand::BlocksLoaded { id, blocks } => self.blocks_loaded(id, blocks),
            EngineCommand::Pin { prompt, pin, reply } => match &self.disk {
                Some(disk) => {
                    let mut hashes = Vec::new();
                    let block_size = self.scheduler.blocks().block_size();
                    extend_block_hashes(&mut hashes, &prompt, block_size, self.cache_salt);
                    disk.pin(hashes, pin, reply);
                }
                None => {
                    let _ = reply.send(Err("pinning needs the disk cache (--kv-disk)".into()));
                }
            },
            EngineCommand::Shutdown => return false,
        }
        true
    }

    fn add(&mut self, id: RequestId, request: ValidatedRequest, reply: UnboundedSender<TokenEvent>) {
        let req = request.into_parts();
        let max_total = (req.prompt.len() + req.max_tokens as usize).min(self.scheduler.max_model_len());
        let needed = self.scheduler.blocks().blocks_for(max_total);
        let total = self.scheduler.blocks().pool().num_total();
        if needed > total {
            // Validation sizes requests against this pool; this is a defence, not a path.
            let _ = reply.send(TokenEvent::Error(EngineError::StepFailed(format!(
                "request needs {needed} KV blocks but the pool has {total}"
            ))));
            return;
        }
        let block_size = self.scheduler.blocks().block_size();
        let usage = Usage {
            prompt_tokens: req.prompt.len() as u32,
            ..Usage::default()
        };
        let spec = SequenceSpec {
            prompt: req.prompt,
            max_tokens: req.max_tokens as usize,
            stop_tokens: req.stop_tokens,
            cache_salt: self.cache_salt,
            // Prompt logprobs need every prompt position's logits: nothing may come from the cache.
            reuse_cached_prefix: req.embed.is_none_or(|p| p.reuses_cached_prefix())
                && req.params.prompt_logprobs.is_none(),
            // Each prompt position's logits row is a vocabulary of floats: chunked, a step holds
            // at most PROMPT_LOGPROBS_CHUNK of them per such request, whatever the budget.
            max_chunk: req.params.prompt_logprobs.map(|_| PROMPT_LOGPROBS_CHUNK),
            images: req.images.iter().map(|i| i.span).collect(),
        };
        let seq = Sequence::new(id, spec, block_size);
        tracing::debug!(request_id = %id, prompt_tokens = usage.prompt_tokens, "admitted to queue");
        let on_disk = self.prefix_on_disk(&seq);
        let state = RequestState {
            reply,
            prompt_logprobs: req.params.prompt_logprobs,
            sampler: SamplerState::new(req.params),
            constraint: req.constraint,
            embedding: req.embed.map(Pooled::new),
            disk_hit_tokens: 0,
            images: req.images,
            usage,
            arrived_at: Instant::now(),
            first_scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
        };
        match (&self.disk, on_disk.is_empty()) {
            (Some(disk), false) => {
                disk.read(id, on_disk);
                self.loading.insert(id, (seq, state));
            }
            _ => self.scheduler.add(seq, state),
        }
    }

    /// The blocks of `seq`'s prompt that follow its prefix cached in memory and are on disk
    /// (never the block holding the last prompt token, which is always computed).
    fn prefix_on_disk(&self, seq: &Sequence) -> Vec<BlockHash> {
        let Some(disk) = &self.disk else {
            return Vec::new();
        };
        if !seq.reuse_cached_prefix {
            return Vec::new();
        }
        let blocks = self.scheduler.blocks();
        let in_memory = blocks.find_cached_prefix(&seq.block_hashes, seq.tokens.len()).len();
        let max_blocks = seq.tokens.len().saturating_sub(1) / blocks.block_size();
        seq.block_hashes[in_memory.min(max_blocks)..max_blocks]
            .iter()
            .take_while(|h| disk.contains(**h))
            .copied()
            .collect()
    }

    /// Blocks read back from disk for a waiting request: each goes into a free block of the
    /// prefix cache (where the request's lookup finds it), then the request joins the queue.
    fn blocks_loaded(&mut self, id: RequestId, blocks: Vec<(BlockHash, Vec<u8>)>) {
        let Some((seq, mut state)) = self.loading.remove(&id) else {
            return;
        };
        let block_size = self.scheduler.blocks().block_size() as u64;
        for (hash, bytes) in blocks {
            let kv = &mut self.kv;
            let adopted = self.scheduler.blocks_mut().adopt_cached(hash, |block| {
                kv.write_block(block.0 as usize, &bytes)
                    .map_err(|e| tracing::warn!(error = %e, "KV disk cache: a block could not be restored"))
                    .is_ok()
            });
            if !adopted {
                break;
            }
            state.disk_hit_tokens += block_size as u32;
        }
        self.scheduler.add(seq, state);
    }

    /// Hands every block newly cached this step to the disk tier.
    fn write_through(&mut self) -> Result<(), EngineError> {
        let Some(disk) = &self.disk else {
            return Ok(());
        };
        for (block, hash) in self.scheduler.blocks_mut().take_newly_cached() {
            disk.write(hash, self.kv.read_block(block.0 as usize)?);
        }
        Ok(())
    }

    /// The client left: free the sequence, count it as aborted.
    fn abort(&mut self, id: RequestId) {
        if self.scheduler.abort(id).is_some() {
            self.stats.num_aborted.fetch_add(1, Ordering::Relaxed);
            self.metrics.finished("abort");
            tracing::debug!(request_id = %id, "aborted; blocks freed");
        }
    }

    /// The text stage matched a stop string: finish with `stop`, counting only the tokens
    /// it kept.
    fn stop(&mut self, id: RequestId, completion_tokens: u32) {
        let Some((_, mut state)) = self.scheduler.abort(id) else {
            return;
        };
        state.usage.completion_tokens = state.usage.completion_tokens.min(completion_tokens);
        self.finish(id, state, FinishReason::Stop, Instant::now());
    }

    /// A dropped receiver means the client left.
    fn abort_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .scheduler
            .entries()
            .filter(|(_, r)| r.reply.is_closed())
            .map(|(seq, _)| seq.id)
            .collect();
        for id in gone {
            self.abort(id);
        }
        let gone_loading: Vec<RequestId> = self
            .loading
            .iter()
            .filter(|(_, (_, r))| r.reply.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone_loading {
            self.loading.remove(&id);
            self.stats.num_aborted.fetch_add(1, Ordering::Relaxed);
            self.metrics.finished("abort");
        }
    }

    /// Fails requests that waited longer than the queue timeout without being scheduled.
    fn expire_queued(&mut self) {
        let Some(limit) = self.queue_timeout else {
            return;
        };
        let expired: Vec<(RequestId, Duration)> = self
            .scheduler
            .entries()
            .filter(|(_, r)| r.first_scheduled_at.is_none())
            .map(|(seq, r)| (seq.id, r.arrived_at.elapsed()))
            .filter(|(_, waited)| *waited > limit)
            .collect();
        for (id, waited) in expired {
            if let Some((_, req)) = self.scheduler.abort(id) {
                self.metrics.finished("error");
                let _ = req.reply.send(TokenEvent::Error(EngineError::QueueTimeout {
                    waited_ms: waited.as_millis() as u64,
                    limit_ms: limit.as_millis() as u64,
                }));
            }
        }
    }

    /// One step under [INV_STEP_ISOLATION].
    fn guarded_step(&mut self) {
        let device = self.device.clone();
        let error = match catch_unwind(AssertUnwindSafe(|| {
            crate::device::on_compute_threads(&device, || self.step())
        })) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panic: {}", panic_message(panic.as_ref())),
        };
        self.stats.num_failed_steps.fetch_add(1, Ordering::Relaxed);
        let ids = std::mem::take(&mut self.step_ids);
        tracing::error!(error = %error, requests = ids.len(), "engine step failed; failing its requests");
        let err = EngineError::StepFailed(error);
        let cleanup = catch_unwind(AssertUnwindSafe(|| {
            if ids.is_empty() {
                self.fail_all(err.clone());
            } else {
                self.fail(&ids, err.clone());
            }
        }));
        if cleanup.is_err() {
            tracing::error!("cleanup after a failed step panicked; resetting the scheduler");
            self.reset_scheduler();
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let mut clock = PhaseClock::new(self.metrics.clone());
        let mut out = self.scheduler.schedule();
        if out.seqs.is_empty() {
            return Ok(());
        }
        self.step_ids = out.seqs.iter().map(|s| s.id).collect();
        self.stats.peak_batch_seqs.fetch_max(out.seqs.len(), Ordering::Relaxed);
        self.announce_scheduled(&out);
        self.restart_preempted_pools(&out.preempted);
        let pools = PoolPlan::new(&mut out, |id| {
            self.scheduler
                .entry(id)
                .and_then(|(_, r)| r.embedding.as_ref().map(Pooled::pooling))
        });
        let prompt_rows = PromptRows::new(&out, |id| {
            let (seq, req) = self.scheduler.entry(id)?;
            req.prompt_logprobs.map(|_| seq.num_prompt_tokens)
        });
        clock.lap("schedule");
        let mut batch = HostBatch::build(&out, &self.scheduler);
        let num_sampling = batch.logits_rows.len();
        batch.logits_rows.extend_from_slice(&prompt_rows.batch_rows);
        let images = ImagePlan::new(&out, &batch.positions, |id| {
            self.scheduler.entry(id).map(|(_, r)| r.images.as_slice())
        })
        .map(|plan| plan.encode(self.model.as_ref(), &self.device))
        .transpose()?;
        clock.lap("prepare");
        let (mut logits, hidden) = self.forward(batch, &pools.hidden_rows, images)?;
        if !prompt_rows.is_empty() {
            self.send_prompt_logprobs(
                &prompt_rows,
                &logits.narrow(0, num_sampling, prompt_rows.batch_rows.len())?,
            )?;
            logits = logits.narrow(0, 0, num_sampling)?;
        }
        clock.lap("forward");
        let ids: Vec<RequestId> = out.seqs.iter().filter(|s| s.sample).map(|s| s.id).collect();
        let (masks, broken) = self.constraint_masks(&ids);
        let (sampled, logprobs) = self.sample(&ids, masks, &logits)?;
        clock.lap("sample");
        let results = self.scheduler.update(&out, &sampled);
        self.write_through()?;
        self.emit(results, logprobs);
        self.follow_constraints(&ids, &sampled, broken);
        if let Some(hidden) = hidden {
            self.pool(&pools, &hidden)?;
        }
        clock.lap("update");
        self.step_ids.clear();
        Ok(())
    }

    /// The step's logits: replayed from a CUDA graph where one applies, else an eager forward;
    /// with the final hidden states of `hidden_rows` when there are any (embeddings), and the
    /// step's image soft tokens when it feeds any.
    fn forward(
        &mut self,
        batch: HostBatch,
        hidden_rows: &[u32],
        images: Option<ImageRows>,
    ) -> candle_core::Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
        if !hidden_rows.is_empty() {
            let rows = candle_core::Tensor::from_slice(hidden_rows, hidden_rows.len(), &self.device)?;
            let mut batch = batch.upload(&self.device)?;
            batch.images = images;
            let (logits, hidden) = self.model.forward_hidden(&batch, &rows, &mut self.kv)?;
            return Ok((logits, Some(hidden)));
        }
        if let (Some(graphs), None) = (&mut self.graphs, &images) {
            if let Some(logits) = graphs.forward(self.model.as_ref(), &batch, &mut self.kv)? {
                return Ok((logits, None));
            }
        }
        let mut batch = batch.upload(&self.device)?;
        batch.images = images;
        Ok((self.model.forward(&batch, &mut self.kv)?, None))
    }

    /// Sends each sequence its prompt tokens' logprobs from `logits` (the step's prompt rows).
    fn send_prompt_logprobs(&mut self, plan: &PromptRows, logits: &candle_core::Tensor) -> Result<(), EngineError> {
        let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        for part in &plan.parts {
            let Some((seq, req)) = self.scheduler.entry(part.id) else {
                continue;
            };
            let n = req.prompt_logprobs.unwrap_or(0) as usize;
            let logprobs = rows[part.rows.clone()]
                .iter()
                .enumerate()
                .map(|(i, row)| super::sampler::logprobs_of(row, seq.tokens[part.first + i], n))
                .collect();
            let _ = req.reply.send(TokenEvent::PromptLogprobs {
                first: part.first,
                logprobs,
            });
        }
        Ok(())
    }

    /// Adds each embedding sequence's rows of `hidden` to its pool; a sequence whose prompt is
    /// done gets its vector and finishes.
    fn pool(&mut self, plan: &PoolPlan, hidden: &candle_core::Tensor) -> Result<(), EngineError> {
        let rows = hidden.to_vec2::<f32>()?;
        let now = Instant::now();
        for part in &plan.parts {
            let Some((_, req)) = self.scheduler.entry_mut(part.id) else {
                continue;
            };
            let Some(pool) = req.embedding.as_mut() else {
                continue;
            };
            pool.add(rows[part.rows.clone()].iter().map(Vec::as_slice));
            if !part.last_step {
                continue;
            }
            let vector = pool.vector();
            req.first_token_at = Some(now);
            let _ = req.reply.send(TokenEvent::Embedding(vector));
            if let Some((_, req)) = self.scheduler.abort(part.id) {
                self.finish(part.id, req, FinishReason::Stop, now);
            }
        }
        Ok(())
    }

    /// Preempted embeddings are recomputed from their first token: their pools start over.
    fn restart_preempted_pools(&mut self, preempted: &[RequestId]) {
        for &id in preempted {
            if let Some(pool) = self.scheduler.entry_mut(id).and_then(|(_, r)| r.embedding.as_mut()) {
                pool.reset();
            }
        }
    }

    /// One token per sampling sequence of `out`, from `logits` (`[S, vocab]`, one row each).
    /// Plain-argmax rows are decided on the device and only their ids cross to the host; the
    /// other rows are copied and sampled on the host.
    fn sample(
        &mut self,
        ids: &[RequestId],
        mut masks: Vec<Option<Vec<u32>>>,
        logits: &candle_core::Tensor,
    ) -> Result<(Vec<u32>, Vec<Option<super::output::Logprobs>>), EngineError> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // The device sampler reports no chosen tokens' logprobs: a step with such a row samples
        // on the host (its plain-argmax rows still decide on the device).
        let reports = ids.iter().any(|id| {
            self.scheduler
                .entry(*id)
                .is_some_and(|(_, req)| !req.sampler.params().report_tokens.is_empty())
        });
        if crate::compute::fused::runs_kernels(logits.device()) && !reports {
            return self.sample_on_device(ids, masks, logits);
        }
        let host_rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .filter(|(row, id)| {
                masks[*row].is_some()
                    || self
                        .scheduler
                        .entry_mut(**id)
                        .is_some_and(|(_, req)| !req.sampler.is_plain_argmax())
            })
            .map(|(row, _)| row as u32)
            .collect();
        let mut sampled = if host_rows.len() < ids.len() {
            logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?
        } else {
            vec![0; ids.len()]
        };
        let mut logprobs = vec![None; ids.len()];
        if host_rows.is_empty() {
            return Ok((sampled, logprobs));
        }
        let index = candle_core::Tensor::from_vec(host_rows.clone(), host_rows.len(), logits.device())?;
        let rows = logits.index_select(&index, 0)?.to_vec2::<f32>()?;
        for (&row, mut values) in host_rows.iter().zip(rows) {
            let (seq, req) = self
                .scheduler
                .entry_mut(ids[row as usize])
                .expect("invariant: scheduled sequences are live");
            let mask = masks[row as usize].take();
            let t = req
                .sampler
                .sample(&mut values, &seq.tokens, seq.num_prompt_tokens, mask.as_deref());
            sampled[row as usize] = t.id;
            logprobs[row as usize] = t.logprobs;
        }
        Ok((sampled, logprobs))
    }

    /// Every row sampled by the device kernel: only ids and requested logprobs cross back.
    fn sample_on_device(
        &mut self,
        ids: &[RequestId],
        masks: Vec<Option<Vec<u32>>>,
        logits: &candle_core::Tensor,
    ) -> Result<(Vec<u32>, Vec<Option<super::output::Logprobs>>), EngineError> {
        let vocab = logits.dim(candle_core::D::Minus1)?;
        let rows: Vec<_> = ids
            .iter()
            .zip(masks)
            .map(|(&id, allowed)| {
                let (seq, req) = self
                    .scheduler
                    .entry_mut(id)
                    .expect("invariant: scheduled sequences are live");
                let mut row = req.sampler.device_row(&seq.tokens, seq.num_prompt_tokens, vocab);
                row.allowed = allowed;
                row
            })
            .collect();
        let samples = crate::compute::fused::sample_rows(logits, &rows)?
            .ok_or_else(|| EngineError::StepFailed("the device sampler did not run".into()))?;
        Ok(samples
            .into_iter()
            .map(|s| {
                let logprobs = s.logprob.map(|logprob| super::output::Logprobs {
                    logprob,
                    top: s
                        .top
                        .iter()
                        .map(|&(id, logprob)| super::output::TokenLogprob { id, logprob })
                        .collect(),
                    reported: Vec::new(),
                });
                (s.id, logprobs)
            })
            .unzip())
    }

    /// The tokens each sampling row's output constraint allows next (None: unconstrained), and
    /// the requests whose constraint could not say (their rows stay unconstrained this step;
    /// `follow_constraints` fails them once it is done). Called after the forward pass is
    /// queued, so on a GPU this host work overlaps it.
    fn constraint_masks(&mut self, ids: &[RequestId]) -> ConstraintMasks {
        let mut broken = Vec::new();
        let masks = ids
            .iter()
            .map(|&id| {
                let (seq, req) = self.scheduler.entry_mut(id)?;
                let left = seq.max_tokens.saturating_sub(seq.num_generated());
                match req.constraint.as_mut()?.allowed(left, seq.max_tokens) {
                    Ok(mask) => Some(mask),
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "output constraint failed");
                        req.constraint = None;
                        broken.push((id, e));
                        None
                    }
                }
            })
            .collect();
        (masks, broken)
    }

    /// Feeds each constrained sequence still running the token it just got (`ids` and
    /// `sampled` row by row): a completed output ends the request (`stop`); a constraint that
    /// broke, now or while masking (`broken`), fails its request.
    fn follow_constraints(&mut self, ids: &[RequestId], sampled: &[u32], mut broken: Vec<(RequestId, String)>) {
        let mut done = Vec::new();
        for (&id, &token) in ids.iter().zip(sampled) {
            let Some((_, req)) = self.scheduler.entry_mut(id) else {
                continue;
            };
            match req.constraint.as_mut().map(|c| c.advance(token)) {
                Some(Ok(true)) => done.push(id),
                Some(Err(e)) => broken.push((id, e)),
                Some(Ok(false)) | None => {}
            }
        }
        for id in done {
            self.stop(id, u32::MAX);
        }
        for (id, e) in broken {
            self.fail(&[id], EngineError::StepFailed(format!("output constraint: {e}")));
        }
    }

    /// Tells each newly scheduled request how much of its prompt the prefix cache served.
    fn announce_scheduled(&mut self, out: &SchedulerOutput) {
        let now = Instant::now();
        for s in &out.seqs {
            let Some((seq, req)) = self.scheduler.entry_mut(s.id) else {
                continue;
            };
            if req.first_scheduled_at.is_some() {
                continue;
            }
            req.first_scheduled_at = Some(now);
            let cached = seq.num_cached_prompt_tokens.unwrap_or(0) as u32;
            req.usage.cached_tokens = cached;
            let prompt = u64::from(req.usage.prompt_tokens);
            self.metrics.prompt_tokens.inc_by(prompt);
            self.metrics.prefix_cache_queries.inc_by(prompt);
            // Hits split by tier: blocks read back for this request count as disk hits.
            let from_disk = req.disk_hit_tokens.min(cached);
            self.metrics.prefix_cache_hits.inc_by(u64::from(cached - from_disk));
            self.metrics.kv_disk_hits.inc_by(u64::from(from_disk));
            let _ = req.reply.send(TokenEvent::Scheduled { cached_tokens: cached });
        }
    }

    fn emit(&mut self, results: Vec<StepResult<RequestState>>, logprobs: Vec<Option<super::output::Logprobs>>) {
        let now = Instant::now();
        for (r, logprobs) in results.into_iter().zip(logprobs) {
            let event = TokenEvent::Token { id: r.token, logprobs };
            match (r.finished, r.released) {
                (Some(reason), Some(mut req)) => {
                    record_token(&self.metrics, &mut req, now);
                    let _ = req.reply.send(event);
                    self.finish(r.id, req, reason, now);
                }
                _ => {
                    if let Some((_, req)) = self.scheduler.entry_mut(r.id) {
                        record_token(&self.metrics, req, now);
                        let _ = req.reply.send(event);
                    }
                }
            }
        }
    }

    /// Sends the final event of a request already removed from the scheduler.
    fn finish(&mut self, id: RequestId, req: RequestState, reason: FinishReason, now: Instant) {
        let mut usage = req.usage;
        let scheduled = req.first_scheduled_at.unwrap_or(now);
        let first = req.first_token_at.unwrap_or(now);
        usage.queue_time = scheduled.saturating_duration_since(req.arrived_at);
        usage.prefill_time = first.saturating_duration_since(scheduled);
        usage.decode_time = now.saturating_duration_since(first);
        self.metrics
            .request_duration
            .observe(now.saturating_duration_since(req.arrived_at).as_secs_f64());
        self.metrics.finished(reason.as_str());
        tracing::info!(
            request_id = %id,
            reason = reason.as_str(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "finished"
        );
        let _ = req.reply.send(TokenEvent::Finished { reason, usage });
    }

    /// Fails the given requests (a failed step), freeing their blocks.
    fn fail(&mut self, ids: &[RequestId], err: EngineError) {
        for &id in ids {
            if let Some((_, req)) = self.scheduler.abort(id) {
                self.metrics.finished("error");
                let _ = req.reply.send(TokenEvent::Error(err.clone()));
            }
        }
    }

    /// Fails every request in flight (and those waiting for blocks from disk).
    fn fail_all(&mut self, err: EngineError) {
        let ids: Vec<RequestId> = self.scheduler.entries().map(|(seq, _)| seq.id).collect();
        self.fail(&ids, err.clone());
        for (_, (_, req)) in self.loading.drain() {
            self.metrics.finished("error");
            let _ = req.reply.send(TokenEvent::Error(err.clone()));
        }
    }

    /// Last resort after a panic in cleanup: a fresh, empty scheduler and block pool. Dropping
    /// the old one drops every reply channel, so each client sees the engine give up on it.
    fn reset_scheduler(&mut self) {
        let blocks = BlockManager::new(
            self.scheduler.blocks().pool().num_total() + 1,
            self.scheduler.blocks().block_size(),
            self.prefix_cache,
        );
        self.scheduler = Scheduler::new(self.scheduler_cfg.clone(), blocks);
        self.step_ids.clear();
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.num_running.store(self.scheduler.num_running(), Ordering::Relaxed);
        s.num_waiting.store(self.scheduler.num_waiting(), Ordering::Relaxed);
        s.kv_blocks_free
            .store(self.scheduler.blocks().pool().num_free(), Ordering::Relaxed);
        s.num_preemptions
            .store(self.scheduler.num_preemptions(), Ordering::Relaxed);
    }
}

/// Times the phases of one step into `step_phase_seconds`.
struct PhaseClock {
    metrics: Arc<EngineMetrics>,
    last: Instant,
}

impl PhaseClock {
    fn new(metrics: Arc<EngineMetrics>) -> Self {
        Self {
            metrics,
            last: Instant::now(),
        }
    }

    /// Records the time since the previous lap as `phase`.
    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.metrics.step_phase_took(phase, (now - self.last).as_secs_f64());
        self.last = now;
    }
}

/// Counts one generated token of `req` in its usage and in the metrics.
fn record_token(metrics: &EngineMetrics, req: &mut RequestState, now: Instant) {
    match req.last_token_at {
        None => metrics
            .time_to_first_token
            .observe(now.saturating_duration_since(req.arrived_at).as_secs_f64()),
        Some(last) => metrics
            .inter_token_latency
            .observe(now.saturating_duration_since(last).as_secs_f64()),
    }
    metrics.generation_tokens.inc();
    req.first_token_at.get_or_insert(now);
    req.last_token_at = Some(now);
    req.usage.completion_tokens += 1;
}

/// The text of a caught panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
