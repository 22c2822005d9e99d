//! The engine loop: the only owner of the device, the model, the KV memory and the scheduler.
//!
//! Owner thread: "mlxd-engine". Each step: drain commands, drop sequences whose client left,
//! schedule, run ONE forward over every scheduled token, sample, update, send events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};

use super::batch::build_batch;
use super::metrics::EngineMetrics;
use super::output::{TokenEvent, Usage};
use super::sampler::SamplerState;
use super::{EngineCommand, EngineConfig, EngineError, EngineStats, GenerateRequest, ModelInfo, RequestId};
use crate::models::{self, KvLayout, LoadProgress};
use crate::models::{Model, PagedKvCache};
use crate::scheduler::kv::BlockManager;
use crate::scheduler::SchedulerConfig;
use crate::scheduler::{Scheduler, SchedulerOutput, Sequence, SequenceSpec, StepResult};

/// A request the engine is serving.
struct ActiveRequest {
    reply: UnboundedSender<TokenEvent>,
    sampler: SamplerState,
    usage: Usage,
    arrived_at: Instant,
    first_scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// Everything the engine thread owns.
pub(crate) struct EngineCore {
    model: Box<dyn Model>,
    kv: PagedKvCache,
    scheduler: Scheduler,
    device: Device,
    stats: Arc<EngineStats>,
    metrics: Arc<EngineMetrics>,
    queue_timeout: Option<Duration>,
    cache_salt: u64,
    requests: HashMap<RequestId, ActiveRequest>,
}

impl EngineCore {
    /// Loads the model, sizes and allocates the KV pool, and builds the scheduler.
    pub(crate) fn load(
        cfg: &EngineConfig,
        stats: Arc<EngineStats>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<(Self, ModelInfo), EngineError> {
        let device = Device::Cpu;
        let progress = if cfg.show_progress {
            LoadProgress::stderr()
        } else {
            LoadProgress::hidden()
        };
        let model = models::load(&cfg.model_path, &device, cfg.dtype, &progress)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let mc = model.config().clone();
        let max_model_len = cfg
            .max_model_len
            .map_or(mc.max_position_embeddings, |m| m.min(mc.max_position_embeddings));
        let layout = KvLayout {
            num_layers: mc.num_layers,
            kv_width: mc.num_kv_heads * mc.head_dim,
            block_size: cfg.block_size,
            dtype: cfg.dtype,
        };
        // +1: block 0 is the null block. Never more than every sequence at full length needs.
        let by_budget = (cfg.kv_memory_bytes / layout.bytes_per_block() as u64) as usize;
        let by_need = cfg.max_num_seqs * max_model_len.div_ceil(cfg.block_size) + 1;
        let num_blocks = by_budget.min(by_need);
        if num_blocks < 2 {
            return Err(EngineError::Load(format!(
                "KV memory of {} bytes holds no block of {} bytes; raise --kv-memory",
                cfg.kv_memory_bytes,
                layout.bytes_per_block()
            )));
        }
        let kv = PagedKvCache::new(layout, num_blocks, &device)?;
        let blocks = BlockManager::new(num_blocks, cfg.block_size, cfg.enable_prefix_cache);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_model_len,
            },
            blocks,
        );
        stats.kv_blocks_total.store(num_blocks - 1, Ordering::Relaxed);
        let info = ModelInfo {
            model: mc,
            max_model_len,
            num_kv_blocks: num_blocks - 1,
            block_size: cfg.block_size,
            kv_memory_bytes: (num_blocks * layout.bytes_per_block()) as u64,
        };
        // Prefix-cache entries are only valid for the same weights computed the same way.
        let salt_source = format!("{}|{:?}", cfg.model_path.display(), cfg.dtype);
        let core = Self {
            model,
            kv,
            scheduler,
            device,
            stats,
            metrics,
            queue_timeout: cfg.queue_timeout,
            cache_salt: xxhash_rust::xxh3::xxh3_64(salt_source.as_bytes()),
            requests: HashMap::new(),
        };
        Ok((core, info))
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
            let mut open = true;
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            open = false;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if !open {
                break;
            }
            self.abort_disconnected();
            self.expire_queued();
            if self.scheduler.has_work() {
                if let Err(e) = self.step() {
                    tracing::error!(error = %e, "engine step failed; failing in-flight requests");
                    self.fail_all(e);
                }
            }
            self.publish_stats();
        }
        self.fail_all(EngineError::Unavailable);
        self.stats.healthy.store(false, Ordering::Relaxed);
        tracing::info!("engine stopped");
    }

    /// Applies one command; false means shut down.
    fn handle(&mut self, cmd: EngineCommand) -> bool {
        match cmd {
            EngineCommand::Add { id, request, reply } => self.add(id, *request, reply),
            EngineCommand::Shutdown => return false,
        }
        true
    }

    fn add(&mut self, id: RequestId, req: GenerateRequest, reply: UnboundedSender<TokenEvent>) {
        let max_total = (req.prompt.len() + req.max_tokens as usize).min(self.scheduler.max_model_len());
        let needed = self.scheduler.blocks().blocks_for(max_total);
        let total = self.scheduler.blocks().pool().num_total();
        if needed > total {
            let _ = reply.send(TokenEvent::Error(EngineError::TooLargeForKvPool { needed, total }));
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
        };
        let seq = Sequence::new(id, spec, block_size);
        tracing::debug!(request_id = %id, prompt_tokens = usage.prompt_tokens, "admitted to queue");
        self.requests.insert(
            id,
            ActiveRequest {
                reply,
                sampler: SamplerState::new(req.params),
                usage,
                arrived_at: seq.arrived_at,
                first_scheduled_at: None,
                first_token_at: None,
                last_token_at: None,
            },
        );
        self.scheduler.add(seq);
    }

    fn abort(&mut self, id: RequestId) {
        if self.scheduler.abort(id).is_some() {
            self.stats.num_aborted.fetch_add(1, Ordering::Relaxed);
            self.metrics.finished("abort");
            tracing::debug!(request_id = %id, "aborted; blocks freed");
        }
        self.requests.remove(&id);
    }

    /// A dropped receiver means the client left (or the server matched a stop string).
    fn abort_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.reply.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// Fails requests that waited longer than the queue timeout without being scheduled.
    fn expire_queued(&mut self) {
        let Some(limit) = self.queue_timeout else {
            return;
        };
        let expired: Vec<(RequestId, Duration)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.first_scheduled_at.is_none())
            .map(|(id, r)| (*id, r.arrived_at.elapsed()))
            .filter(|(_, waited)| *waited > limit)
            .collect();
        for (id, waited) in expired {
            self.scheduler.abort(id);
            if let Some(req) = self.requests.remove(&id) {
                self.metrics.finished("error");
                let _ = req.reply.send(TokenEvent::Error(EngineError::QueueTimeout {
                    waited_ms: waited.as_millis() as u64,
                    limit_ms: limit.as_millis() as u64,
                }));
            }
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let out = self.scheduler.schedule();
        if out.seqs.is_empty() {
            return Ok(());
        }
        self.stats.peak_batch_seqs.fetch_max(out.seqs.len(), Ordering::Relaxed);
        self.announce_scheduled(&out);
        let batch = build_batch(&out, &self.scheduler, &self.device)?;
        let logits = self.model.forward(&batch, &mut self.kv)?.to_vec2::<f32>()?;
        let mut sampled = Vec::with_capacity(logits.len());
        let mut logprobs = Vec::with_capacity(logits.len());
        for (s, mut row) in out.seqs.iter().filter(|s| s.sample).zip(logits) {
            let seq = self
                .scheduler
                .seq(s.id)
                .expect("invariant: scheduled sequences are live");
            let req = self
                .requests
                .get_mut(&s.id)
                .expect("invariant: every sequence has a request");
            let t = req.sampler.sample(&mut row, &seq.tokens, seq.num_prompt_tokens);
            sampled.push(t.id);
            logprobs.push(t.logprobs);
        }
        let results = self.scheduler.update(&out, &sampled);
        self.emit(results, logprobs);
        Ok(())
    }

    /// Tells each newly scheduled request how much of its prompt the prefix cache served.
    fn announce_scheduled(&mut self, out: &SchedulerOutput) {
        let now = Instant::now();
        for s in &out.seqs {
            let Some(req) = self.requests.get_mut(&s.id) else {
                continue;
            };
            if req.first_scheduled_at.is_some() {
                continue;
            }
            req.first_scheduled_at = Some(now);
            let cached = self
                .scheduler
                .seq(s.id)
                .and_then(|q| q.num_cached_prompt_tokens)
                .unwrap_or(0) as u32;
            req.usage.cached_tokens = cached;
            let prompt = u64::from(req.usage.prompt_tokens);
            self.metrics.prompt_tokens.inc_by(prompt);
            self.metrics.prefix_cache_queries.inc_by(prompt);
            self.metrics.prefix_cache_hits.inc_by(u64::from(cached));
            let _ = req.reply.send(TokenEvent::Scheduled { cached_tokens: cached });
        }
    }

    fn emit(&mut self, results: Vec<StepResult>, logprobs: Vec<Option<super::output::Logprobs>>) {
        let now = Instant::now();
        for (r, logprobs) in results.into_iter().zip(logprobs) {
            let Some(req) = self.requests.get_mut(&r.id) else {
                continue;
            };
            let m = &self.metrics;
            match req.last_token_at {
                None => m.time_to_first_token.observe((now - req.arrived_at).as_secs_f64()),
                Some(last) => m.inter_token_latency.observe((now - last).as_secs_f64()),
            }
            m.generation_tokens.inc();
            req.first_token_at.get_or_insert(now);
            req.last_token_at = Some(now);
            req.usage.completion_tokens += 1;
            let _ = req.reply.send(TokenEvent::Token { id: r.token, logprobs });
            let Some(reason) = r.finished else {
                continue;
            };
            let req = self.requests.remove(&r.id).expect("invariant: looked up above");
            let mut usage = req.usage;
            let scheduled = req.first_scheduled_at.unwrap_or(now);
            let first = req.first_token_at.unwrap_or(now);
            usage.queue_time = scheduled - req.arrived_at;
            usage.prefill_time = first - scheduled;
            usage.decode_time = now - first;
            self.metrics
                .request_duration
                .observe((now - req.arrived_at).as_secs_f64());
            self.metrics.finished(reason.as_str());
            tracing::info!(
                request_id = %r.id,
                reason = reason.as_str(),
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                "finished"
            );
            let _ = req.reply.send(TokenEvent::Finished { reason, usage });
        }
    }

    fn fail_all(&mut self, err: EngineError) {
        for (id, req) in self.requests.drain() {
            self.scheduler.abort(id);
            self.metrics.finished("error");
            let _ = req.reply.send(TokenEvent::Error(err.clone()));
        }
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
