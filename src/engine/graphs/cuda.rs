//! CUDA graphs for decode steps, in a `cuda` build.
//!
//! A decode step of a small batch is bound by the host issuing ~250 kernels, not by the GPU
//! running them. The first decode step of each batch-size bucket runs normally, reading its
//! inputs from fixed device buffers, and is then captured into a CUDA graph; later decode
//! steps of that bucket copy their inputs into those buffers (one upload) and replay the graph
//! (one launch). Batches are padded to their bucket with rows that write and read only the
//! null KV block. Steps with prompt tokens run eagerly, as does everything after a failed
//! capture (a model whose forward reads back to the host, such as GGUF's embedding lookup).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Tensor};

use crate::compute::batch::{BatchInput, FixedDecode};
use crate::compute::cuda;
use crate::compute::paged_kv::PagedKvCache;
use crate::engine::batch::HostBatch;
use crate::models::Model;

/// Batch sizes with a graph of their own; a batch runs in the smallest that holds it.
const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
/// u32 values per row before the context slots: token id, position, slot, logits row and the
/// four of the sequence table.
const PER_ROW: usize = 8;

/// The captured graphs, by bucket.
pub struct DecodeGraphs {
    device: CudaDevice,
    max_context: usize,
    buckets: HashMap<usize, Captured>,
    disabled: bool,
}

/// One bucket's graph and the buffers its addresses are baked into.
struct Captured {
    inputs: Tensor,
    logits: Tensor,
    graph: CudaGraph,
}

impl DecodeGraphs {
    /// Graphs for decode batches whose contexts hold at most `max_context` tokens; None off
    /// CUDA.
    pub fn new(device: &Device, max_context: usize) -> Option<Self> {
        match device {
            Device::Cuda(d) => Some(Self {
                device: d.clone(),
                max_context,
                buckets: HashMap::new(),
                disabled: false,
            }),
            _ => None,
        }
    }

    /// Runs one eager step of every power-of-two row count up to `max_rows` (and `max_rows`
    /// itself, or the bucket the widest decode batch pads to, if larger) before any graph is
    /// captured. candle's quantized matmuls keep per-device scratch buffers that only grow,
    /// freeing the old buffer when a larger step needs more: a graph captured before that
    /// growth would go on writing to the freed address (illegal-address faults or silent
    /// corruption under load). After these steps every buffer is at its largest, so the
    /// addresses graphs bake in stay valid. Each row is a padding row (token 0 at position 0
    /// in slot 0 of the null block); at most `max_logits_rows` rows get logits, as in a real
    /// step (or a bucket's rows, as in a capture).
    pub fn settle_scratch(
        &self,
        model: &dyn Model,
        kv: &mut PagedKvCache,
        max_rows: usize,
        max_logits_rows: usize,
    ) -> Result<()> {
        let device = Device::Cuda(self.device.clone());
        // A capture runs its bucket's padded rows, every one with logits: that can be more than
        // the token budget and the sequence limit allow a real step.
        let widest_bucket = BUCKETS
            .iter()
            .copied()
            .find(|&b| b >= max_rows.min(max_logits_rows))
            .unwrap_or(0);
        let top = max_rows.max(widest_bucket);
        let logits_cap = max_logits_rows.max(widest_bucket);
        let sizes = std::iter::successors(Some(1usize), |&r| (r < top).then_some(r * 2));
        for rows in sizes.map(|r| r.min(top)) {
            let padding = HostBatch {
                token_ids: vec![0; rows],
                positions: vec![0; rows],
                slot_mapping: vec![0; rows],
                context_slots: vec![0; rows],
                q_lens: vec![1; rows],
                kv_lens: vec![1; rows],
                logits_rows: (0..rows.min(logits_cap) as u32).collect(),
            };
            model.forward(&padding.upload(&device)?, kv)?;
        }
        device.synchronize()
    }

    /// The logits (`[S, vocab]`) of a decode step replayed from its bucket's graph (captured
    /// on first use), or None when the step does not qualify and must run eagerly.
    pub fn forward(&mut self, model: &dyn Model, host: &HostBatch, kv: &mut PagedKvCache) -> Result<Option<Tensor>> {
        let n = host.q_lens.len();
        let decode = host.q_lens.iter().all(|&q| q == 1) && host.logits_rows.len() == n;
        let fits = host.kv_lens.iter().all(|&k| k <= self.max_context);
        let bucket = BUCKETS.iter().copied().find(|&b| b >= n);
        let (Some(bucket), true, true, false) = (bucket, decode, fits, self.disabled) else {
            return Ok(None);
        };
        let data = self.inputs(host, bucket);
        if let Some(c) = self.buckets.get(&bucket) {
            cuda::upload_into(&c.inputs, &data)?;
            c.graph.launch().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            return Ok(Some(c.logits.narrow(0, 0, n)?));
        }
        let started = Instant::now();
        match self.capture(model, bucket, &data, kv) {
            Ok((captured, logits)) => {
                tracing::info!(
                    batch = bucket,
                    ms = started.elapsed().as_millis() as u64,
                    "captured a CUDA graph for decode steps"
                );
                self.buckets.insert(bucket, captured);
                Ok(Some(logits.narrow(0, 0, n)?))
            }
            Err(e) => {
                tracing::warn!(error = %e, "CUDA graph capture failed; decode steps run eagerly");
                self.disabled = true;
                Ok(None)
            }
        }
    }

    /// This step's inputs padded to `bucket` rows, in the buffer's layout: token ids,
    /// positions, slots, logits rows (`bucket` each), the sequence table (`4 * bucket`), then
    /// the context slots. A padding row is token 0 at position 0 writing and reading slot 0 of
    /// the null block.
    fn inputs(&self, host: &HostBatch, bucket: usize) -> Vec<u32> {
        let n = host.q_lens.len();
        let pad = |v: &[u32]| {
            v.iter()
                .copied()
                .chain(std::iter::repeat_n(0, bucket - n))
                .collect::<Vec<_>>()
        };
        let mut data = Vec::with_capacity(PER_ROW * bucket + host.context_slots.len() + bucket - n);
        data.extend(pad(&host.token_ids));
        data.extend(pad(&host.positions));
        data.extend(pad(&host.slot_mapping));
        data.extend(0..bucket as u32);
        let mut offset = 0;
        for row in 0..bucket {
            let (kv_len, position) = match host.kv_lens.get(row) {
                Some(&k) => (k, host.positions[row]),
                None => (1, 0),
            };
            data.extend([row as u32, 1, offset as u32, position]);
            offset += kv_len;
        }
        data.extend(pad(&host.context_slots)[..offset].iter().copied());
        data
    }

    /// The model's input tensors as views of `inputs` (layout of [`Self::inputs`]).
    fn views(&self, inputs: &Tensor, bucket: usize) -> Result<BatchInput> {
        let part = |i: usize| inputs.narrow(0, i * bucket, bucket);
        Ok(BatchInput {
            token_ids: part(0)?,
            positions: part(1)?,
            slot_mapping: part(2)?,
            context_slots: inputs.narrow(0, PER_ROW * bucket, bucket * self.max_context)?,
            q_lens: vec![1; bucket],
            kv_lens: vec![self.max_context; bucket],
            logits_rows: part(3)?,
            fixed: Some(FixedDecode {
                seqs: inputs.narrow(0, 4 * bucket, 4 * bucket)?.reshape((bucket, 4))?,
                max_context: self.max_context,
            }),
            images: None,
        })
    }

    /// Runs this step eagerly from the bucket's new buffers (which also loads every kernel and
    /// caches the small uploads candle makes), then records the same forward into a graph.
    /// Returns the graph and this step's logits.
    fn capture(
        &self,
        model: &dyn Model,
        bucket: usize,
        data: &[u32],
        kv: &mut PagedKvCache,
    ) -> Result<(Captured, Tensor)> {
        let device = Device::Cuda(self.device.clone());
        let inputs = Tensor::zeros(PER_ROW * bucket + bucket * self.max_context, DType::U32, &device)?;
        cuda::upload_into(&inputs, data)?;
        let batch = self.views(&inputs, bucket)?;
        let _cache = self.device.enable_cuda_graph_htod_cache();
        let eager = model.forward(&batch, kv)?;
        let logits = Tensor::zeros(eager.shape(), eager.dtype(), &device)?;
        let stream = self.device.cuda_stream();
        let to_candle = |e| candle_core::Error::Cuda(Box::new(e));
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(to_candle)?;
        let recorded = model.forward(&batch, kv).and_then(|out| logits.slice_set(&out, 0, 0));
        // Always end the capture, even after an error: the stream is unusable until then.
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        recorded?;
        let graph = graph
            .map_err(to_candle)?
            .ok_or_else(|| candle_core::Error::Msg("the captured graph is empty".into()))?;
        Ok((Captured { inputs, logits, graph }, eager))
    }
}
