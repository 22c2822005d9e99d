//! The engine loop: the only owner of the device, the model, the KV memory and the scheduler.
//!
//! Owner thread: "mlxd-engine". Each step: drain commands, drop sequences whose client left,
//! schedule, run ONE forward over every scheduled token, sample, update, send events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};

use super::batch::build_batch;
use super::output::{TokenEvent, Usage};
use super::sampler::SamplerState;
use super::{EngineCommand, EngineError, EngineStats, GenerateRequest, RequestId};
use crate::models::{Model, PagedKvCache};
use crate::scheduler::{Scheduler, Sequence, StepResult};

/// A request the engine is serving.
struct ActiveRequest {
    reply: UnboundedSender<TokenEvent>,
    sampler: SamplerState,
    usage: Usage,
    arrived_at: Instant,
    first_scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
}

/// Everything the engine thread owns.
pub(crate) struct EngineCore {
    model: Box<dyn Model>,
    kv: PagedKvCache,
    scheduler: Scheduler,
    device: Device,
    stats: Arc<EngineStats>,
    requests: HashMap<RequestId, ActiveRequest>,
}

impl EngineCore {
    pub(crate) fn new(
        model: Box<dyn Model>,
        kv: PagedKvCache,
        scheduler: Scheduler,
        device: Device,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            model,
            kv,
            scheduler,
            device,
            stats,
            requests: HashMap::new(),
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
            EngineCommand::Abort(id) => self.abort(id),
            EngineCommand::Shutdown => return false,
        }
        true
    }

    fn add(&mut self, id: RequestId, req: GenerateRequest, reply: UnboundedSender<TokenEvent>) {
        let max_total = (req.prompt.len() + req.max_tokens as usize).min(self.scheduler.max_model_len());
        let needed = self.scheduler.blocks().blocks_for(max_total);
        let total = self.scheduler.blocks().pool().num_total();
        if needed > total {
            let _ = reply.send(TokenEvent::Error(EngineError::TooLargeForKvPool {
                needed,
                total,
            }));
            return;
        }
        let block_size = self.scheduler.blocks().block_size();
        let usage = Usage {
            prompt_tokens: req.prompt.len() as u32,
            ..Usage::default()
        };
        let seq = Sequence::new(
            id,
            req.prompt,
            req.max_tokens as usize,
            req.stop_tokens,
            block_size,
        );
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
            },
        );
        self.scheduler.add(seq);
    }

    fn abort(&mut self, id: RequestId) {
        if self.scheduler.abort(id).is_some() {
            self.stats.num_aborted.fetch_add(1, Ordering::Relaxed);
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

    fn step(&mut self) -> Result<(), EngineError> {
        let out = self.scheduler.schedule();
        if out.seqs.is_empty() {
            return Ok(());
        }
        self.stats
            .peak_batch_seqs
            .fetch_max(out.seqs.len(), Ordering::Relaxed);
        let now = Instant::now();
        for s in &out.seqs {
            if let Some(r) = self.requests.get_mut(&s.id) {
                r.first_scheduled_at.get_or_insert(now);
            }
        }
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
            let t = req
                .sampler
                .sample(&mut row, &seq.tokens, seq.num_prompt_tokens);
            sampled.push(t.id);
            logprobs.push(t.logprobs);
        }
        let results = self.scheduler.update(&out, &sampled);
        self.emit(results, logprobs);
        Ok(())
    }

    fn emit(&mut self, results: Vec<StepResult>, logprobs: Vec<Option<super::output::Logprobs>>) {
        let now = Instant::now();
        for (r, logprobs) in results.into_iter().zip(logprobs) {
            let Some(req) = self.requests.get_mut(&r.id) else {
                continue;
            };
            if req.first_token_at.is_none() {
                req.first_token_at = Some(now);
                req.usage.cached_tokens = r.num_cached_prompt_tokens as u32;
            }
            req.usage.completion_tokens += 1;
            let _ = req.reply.send(TokenEvent::Token {
                id: r.token,
                logprobs,
            });
            let Some(reason) = r.finished else {
                continue;
            };
            let req = self
                .requests
                .remove(&r.id)
                .expect("invariant: looked up above");
            let mut usage = req.usage;
            let scheduled = req.first_scheduled_at.unwrap_or(now);
            let first = req.first_token_at.unwrap_or(now);
            usage.queue_time = scheduled - req.arrived_at;
            usage.prefill_time = first - scheduled;
            usage.decode_time = now - first;
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
            let _ = req.reply.send(TokenEvent::Error(err.clone()));
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.num_running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        s.num_waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
        s.kv_blocks_free
            .store(self.scheduler.blocks().pool().num_free(), Ordering::Relaxed);
        s.num_preemptions
            .store(self.scheduler.num_preemptions(), Ordering::Relaxed);
    }
}
