//! A sparse mixture-of-experts feed-forward block: a router picks `top_k` of `num_experts`
//! gated MLPs per token and the block returns their outputs weighted by the router's
//! probabilities (Qwen3-MoE, Mixtral; transformers' `*SparseMoeBlock`), optionally with a norm
//! before the router and a learned scale per expert (Gemma 4's `Gemma4TextRouter`).
//!
//! Experts run grouped: the rows routed to an expert are gathered and multiplied by that
//! expert's weights in one product, so each expert's weights are read once per step for all
//! its rows (weight-stationary, whatever the batch) and no expert without rows is touched.
//! Outputs are added back in ascending expert order, as transformers does. On the CPU, experts
//! in the kernels' packed formats (GGUF and MLX quantized) go one step further: all of a
//! layer's routed experts are multiplied in one parallel pass per projection
//! (`forward_on_host`), so a step pays one dispatch per projection, not one per expert.
//!
//! The routing (softmax and top-k over a few experts per token) is decided on the host; on a
//! GPU that is one small copy per layer, which keeps such steps out of CUDA graphs. With
//! `MLXD_CUDA_GROUPED_EXPERTS=1` (`cuda::moe::grouped_experts`) a GPU's experts are instead
//! stacked once at load (`cuda::moe::DeviceExperts`) and routing, grouping and the products all
//! run on the device, inside graphs; layouts its kernels do not take (f32 or other quantized
//! weights) keep the host routing.

use candle_core::{DType, Result, Tensor};

use super::cpu::kernels::grouped_product;
use super::cpu::packed::PackedMatrix;
use super::layers::{GatedMlp, Linear, RmsNorm};

/// How the router's scores become per-token expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// Divide the kept probabilities by their sum (Mixtral; Qwen3-MoE's `norm_topk_prob`).
    pub normalize: bool,
}

/// The router and the experts of one layer.
#[derive(Debug)]
pub struct SparseMoe {
    router: Linear,
    router_norm: Option<RmsNorm>,
    expert_scales: Option<Vec<f32>>,
    /// One MLP per expert; empty where `grouped` holds them.
    experts: Vec<GatedMlp>,
    routing: Routing,
    /// Whether the experts are the CPU kernels' packed matrices, all multiplied in one pass
    /// per projection (`forward_on_host`).
    on_host: bool,
    /// The experts stacked on the GPU, where its kernels take them.
    #[cfg(feature = "cuda")]
    grouped: Option<crate::compute::cuda::moe::DeviceExperts>,
}

/// The rows routed to one expert and their weights.
#[derive(Debug, Default, PartialEq)]
struct ExpertRows {
    rows: Vec<u32>,
    weights: Vec<f32>,
}

impl SparseMoe {
    /// A block over `experts` (one gated MLP each) chosen by `router` (`[num_experts, hidden]`);
    /// where experts run grouped on a GPU whose kernels take them, they are stacked there and
    /// the per-expert layers dropped.
    pub fn new(router: Linear, experts: Vec<GatedMlp>, routing: Routing) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let grouped = match crate::compute::cuda::moe::grouped_experts() {
            true => on_device::stack(&experts, routing)?,
            false => None,
        };
        #[cfg(feature = "cuda")]
        let experts = if grouped.is_some() { Vec::new() } else { experts };
        let on_host = !experts.is_empty()
            && experts.iter().all(|e| {
                e.activation() == experts[0].activation()
                    && e.down().packed_blocks().is_some()
                    && e.gate_up_parts().iter().all(|p| p.packed_blocks().is_some())
            });
        Ok(Self {
            router,
            router_norm: None,
            expert_scales: None,
            experts,
            routing,
            on_host,
            #[cfg(feature = "cuda")]
            grouped,
        })
    }

    /// The router reads its input through `norm` (Gemma 4: an RMSNorm whose scale folds in
    /// the router's `scale` and `hidden^-0.5`).
    pub fn with_router_norm(mut self, norm: RmsNorm) -> Self {
        self.router_norm = Some(norm);
        self
    }

    /// Each kept expert's weight is multiplied by its scale, after any renormalization
    /// (Gemma 4's `per_expert_scale`).
    pub fn with_expert_scales(mut self, scales: Vec<f32>) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Some(grouped) = &mut self.grouped {
            grouped.set_scales(&scales)?;
        }
        self.expert_scales = Some(scales);
        Ok(self)
    }

    /// Applies the block to `x` (`[T, hidden]`), routed by the router's scores of
    /// `router_input` (the same rows; `x` itself in most families, Gemma 4 routes on the
    /// residual and feeds the experts its own norm of it). Every expert's weighted rows,
    /// gathered in ascending expert order, are added into the output by one `index_add` (rows
    /// are added in that order, as transformers adds them), not one copy of the output per
    /// expert.
    pub fn forward(&self, router_input: &Tensor, x: &Tensor) -> Result<Tensor> {
        let router_input = match &self.router_norm {
            Some(norm) => norm.forward(router_input)?,
            None => router_input.clone(),
        };
        #[cfg(feature = "cuda")]
        if let Some(grouped) = &self.grouped {
            let scores = self.router.forward(&router_input)?;
            return grouped.forward(&scores, x, self.routing.top_k, self.routing.normalize);
        }
        let scores: Vec<Vec<f32>> = self.router.forward(&router_input)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut groups = route(&scores, self.experts.len(), self.routing)?;
        if let Some(scales) = &self.expert_scales {
            for (group, &scale) in groups.iter_mut().zip(scales) {
                group.weights.iter_mut().for_each(|w| *w *= scale);
            }
        }
        if self.on_host && x.dtype() == DType::F32 && x.device().is_cpu() {
            return self.forward_on_host(&groups, x);
        }
        let mut outputs = Vec::new();
        let mut rows: Vec<u32> = Vec::new();
        for (expert, group) in self.experts.iter().zip(&groups) {
            if group.rows.is_empty() {
                continue;
            }
            let n = group.rows.len();
            let ids = Tensor::from_slice(&group.rows, n, x.device())?;
            let y = expert.forward(&x.index_select(&ids, 0)?)?;
            let weights = Tensor::from_slice(&group.weights, (n, 1), x.device())?.to_dtype(y.dtype())?;
            outputs.push(y.broadcast_mul(&weights)?);
            rows.extend_from_slice(&group.rows);
        }
        let out = x.zeros_like()?;
        if outputs.is_empty() {
            return Ok(out); // no rows at all
        }
        let n = rows.len();
        out.index_add(&Tensor::from_vec(rows, n, x.device())?, &Tensor::cat(&outputs, 0)?, 0)
    }
}

impl SparseMoe {
    /// `forward`'s experts on the CPU kernels' packed matrices: every routed expert's gate and
    /// up products in one parallel pass (`kernels::grouped_product`), their activations, every
    /// down product in a second pass, then each row's weighted outputs added in ascending
    /// expert order. The same numbers as one product per expert, without a dispatch (and a
    /// round of tensor ops) per expert: a decode step routes each token to several experts,
    /// and a batch's rows to dozens.
    fn forward_on_host(&self, groups: &[ExpertRows], x: &Tensor) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        fn blocks(layer: &Linear) -> &PackedMatrix {
            layer.packed_blocks().expect("on_host experts are packed")
        }
        let active: Vec<(&GatedMlp, &ExpertRows)> = self
            .experts
            .iter()
            .zip(groups)
            .filter(|(_, g)| !g.rows.is_empty())
            .collect();
        let inputs: Vec<Vec<f32>> = active
            .iter()
            .map(|(_, g)| {
                g.rows
                    .iter()
                    .flat_map(|&r| &xs[r as usize * hidden..(r as usize + 1) * hidden])
                    .copied()
                    .collect()
            })
            .collect();
        let mut jobs = Vec::new();
        for ((mlp, g), input) in active.iter().zip(&inputs) {
            for part in mlp.gate_up_parts() {
                jobs.push((blocks(part), &input[..], g.rows.len()));
            }
        }
        let mut gate_ups = grouped_product(&jobs).into_iter();
        let mut activated = Vec::with_capacity(active.len());
        for (mlp, g) in &active {
            let n = g.rows.len();
            let mut next = |cols: usize| -> Result<Tensor> {
                let values = gate_ups.next().expect("one product per part");
                Tensor::from_vec(values, (n, cols), x.device())
            };
            let (gate, up) = match mlp.gate_up_parts()[..] {
                [both] => {
                    let both = next(blocks(both).out_dim())?;
                    let width = both.dim(1)? / 2;
                    (both.narrow(1, 0, width)?, both.narrow(1, width, width)?)
                }
                [gate, up] => (next(blocks(gate).out_dim())?, next(blocks(up).out_dim())?),
                _ => candle_core::bail!("an expert's gate and up come as one layer or two"),
            };
            activated.push(mlp.activation().gated(&gate, &up)?.flatten_all()?.to_vec1::<f32>()?);
        }
        let jobs: Vec<_> = active
            .iter()
            .zip(&activated)
            .map(|((mlp, g), a)| (blocks(mlp.down()), &a[..], g.rows.len()))
            .collect();
        let outputs = grouped_product(&jobs);
        let mut out = vec![0f32; tokens * hidden];
        for ((_, g), y) in active.iter().zip(&outputs) {
            for ((&row, &weight), y) in g.rows.iter().zip(&g.weights).zip(y.chunks_exact(hidden)) {
                let dst = &mut out[row as usize * hidden..(row as usize + 1) * hidden];
                dst.iter_mut().zip(y).for_each(|(d, &v)| *d += v * weight);
            }
        }
        Tensor::from_vec(out, (tokens, hidden), x.device())
    }
}

/// Each expert's rows and weights: per row, the softmax of its scores, the `top_k` largest
/// (ties to the lower expert), renormalized when the routing says so.
fn route(scores: &[Vec<f32>], num_experts: usize, routing: Routing) -> Result<Vec<ExpertRows>> {
    if routing.top_k == 0 || routing.top_k > num_experts {
        candle_core::bail!("top-{} routing over {num_experts} experts", routing.top_k);
    }
    let mut groups: Vec<ExpertRows> = (0..num_experts).map(|_| ExpertRows::default()).collect();
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for (row, s) in scores.iter().enumerate() {
        if s.len() != num_experts {
            candle_core::bail!("router gives {} scores for {num_experts} experts", s.len());
        }
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = s.iter().map(|&v| (v - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        order.clear();
        order.extend(0..num_experts);
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let kept = &order[..routing.top_k];
        let kept_sum: f32 = kept.iter().map(|&e| exp[e] / total).sum();
        for &e in kept {
            let p = exp[e] / total;
            groups[e].rows.push(row as u32);
            groups[e].weights.push(if routing.normalize { p / kept_sum } else { p });
        }
    }
    Ok(groups)
}

/// A layer's experts stacked for the GPU's grouped kernels (`cuda::moe`), from the layers
/// they were loaded as.
#[cfg(feature = "cuda")]
mod on_device {
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{DType, Device, Result, Tensor};

    use super::Routing;
    use crate::compute::cuda::moe::{
        exact_quantized, DeviceExperts, ExpertMatrix, ExpertWeights, GatedActivation, MAX_EXPERTS, MAX_TOP_K,
    };
    use crate::compute::layers::{Activation, GatedMlp, Linear};

    /// `mlps` (one gated MLP per expert) stacked on their GPU, or None where the kernels do not
    /// take them: not on a GPU, f32 or other quantized weights (or Q8_0 in the exact mode),
    /// biases on some layers only, more than 256 experts or 16 per token. Those keep running
    /// one expert at a time.
    pub(super) fn stack(mlps: &[GatedMlp], routing: Routing) -> Result<Option<DeviceExperts>> {
        if mlps.is_empty() || mlps.len() > MAX_EXPERTS || routing.top_k > MAX_TOP_K {
            return Ok(None);
        }
        let Some(device) = device_of(mlps[0].down()).filter(Device::is_cuda) else {
            return Ok(None);
        };
        let activation = mlps[0].activation();
        if mlps.iter().any(|m| m.activation() != activation) {
            return Ok(None);
        }
        let activation = match activation {
            Activation::Silu => GatedActivation::Silu,
            Activation::GeluTanh => GatedActivation::GeluTanh,
            Activation::ClampedSwiglu { alpha, limit } => GatedActivation::ClampedSwiglu { alpha, limit },
        };
        let gate_up_parts: Vec<Vec<&Linear>> = mlps.iter().map(GatedMlp::gate_up_parts).collect();
        let down_parts: Vec<Vec<&Linear>> = mlps.iter().map(|m| vec![m.down()]).collect();
        let (Some(gate_up_bias), Some(down_bias)) = (stacked_bias(&gate_up_parts)?, stacked_bias(&down_parts)?) else {
            return Ok(None);
        };
        let Some((hidden, inter)) = dims_of(mlps[0].down()) else {
            return Ok(None);
        };
        let (Some(gate_up), Some(down)) = (
            matrix(&gate_up_parts, hidden, &device)?,
            matrix(&down_parts, inter, &device)?,
        ) else {
            return Ok(None);
        };
        DeviceExperts::new(gate_up, down, (gate_up_bias, down_bias), activation, mlps.len()).map(Some)
    }

    /// The experts' `parts` (each expert's layers, stacked by rows: `[gate, up]` or one) as one
    /// matrix over `cols` inputs, or None unless every layer is dense bf16/f16 or Q8_0 blocks
    /// alike, with rows whose width the kernel takes.
    fn matrix(parts: &[Vec<&Linear>], cols: usize, device: &Device) -> Result<Option<ExpertMatrix>> {
        let dense_weight = |l: &&Linear| {
            l.dense()
                .filter(|d| matches!(d.weight().dtype(), DType::BF16 | DType::F16))
                .map(|d| d.weight().clone())
        };
        let dense: Option<Vec<Vec<Tensor>>> = parts.iter().map(|p| p.iter().map(dense_weight).collect()).collect();
        if let Some(dense) = dense {
            if !cols.is_multiple_of(8) || dense.iter().flatten().any(|w| w.dim(1).ok() != Some(cols)) {
                return Ok(None);
            }
            let per_expert = dense.iter().map(|w| Tensor::cat(w, 0)).collect::<Result<Vec<_>>>()?;
            let stacked = Tensor::stack(&per_expert, 0)?.contiguous()?;
            let rows = stacked.dim(1)?;
            return Ok(Some(ExpertMatrix {
                weights: ExpertWeights::Dense(stacked),
                rows,
                cols,
            }));
        }
        let q8_0 = |l: &&Linear| match l {
            Linear::Gguf(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) if t.dtype() == GgmlDType::Q8_0 => Some(t.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(blocks) = parts.iter().flatten().map(q8_0).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        if exact_quantized() || !cols.is_multiple_of(32) || blocks.iter().any(|b| b.shape().dims()[1] != cols) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        let mut rows = 0;
        for b in &blocks {
            bytes.extend_from_slice(&b.data()?);
            rows += b.shape().dims()[0];
        }
        let n = bytes.len();
        Ok(Some(ExpertMatrix {
            weights: ExpertWeights::Q8_0(Tensor::from_vec(bytes, n, device)?),
            rows: rows / parts.len(),
            cols,
        }))
    }

    /// The device a layer's weights live on (dense or GGUF blocks).
    fn device_of(layer: &Linear) -> Option<Device> {
        match layer {
            Linear::Dense(l) | Linear::RowInvariant(l) => Some(l.weight().device().clone()),
            Linear::Gguf(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) => Some(t.device()),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Some(t.device().clone()),
            },
            Linear::Packed(..) => None,
        }
    }

    /// `[out, in]` of a dense or GGUF layer.
    fn dims_of(layer: &Linear) -> Option<(usize, usize)> {
        match layer {
            Linear::Dense(l) | Linear::RowInvariant(l) => l.weight().dims2().ok(),
            Linear::Gguf(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2().ok(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2().ok(),
            },
            Linear::Packed(..) => None,
        }
    }

    /// The experts' biases (each expert's parts concatenated) as f32 `[experts, rows]`:
    /// Some(None) when no layer has one, None when only some do.
    fn stacked_bias(parts: &[Vec<&Linear>]) -> Result<Option<Option<Tensor>>> {
        if parts.iter().flatten().all(|l| l.bias().is_none()) {
            return Ok(Some(None));
        }
        let Some(biases) = parts
            .iter()
            .map(|p| p.iter().map(|l| l.bias().cloned()).collect::<Option<Vec<_>>>())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let per_expert = biases.iter().map(|b| Tensor::cat(b, 0)).collect::<Result<Vec<_>>>()?;
        Ok(Some(Some(
            Tensor::stack(&per_expert, 0)?.to_dtype(DType::F32)?.contiguous()?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_the_top_k_probabilities_per_row() -> Result<()> {
        // Row 0: experts 2 and 0 win; row 1: expert 1 then a tie between 0 and 2 (lower wins).
        let scores = vec![vec![1.0, 0.0, 2.0], vec![0.0, 3.0, 0.0]];
        let plain = route(
            &scores,
            3,
            Routing {
                top_k: 2,
                normalize: false,
            },
        )?;
        let e = |v: f32| v.exp();
        let (z0, z1) = (e(1.0) + e(0.0) + e(2.0), e(0.0) + e(3.0) + e(0.0));
        assert_eq!(plain[0].rows, vec![0, 1]);
        assert_eq!(plain[1].rows, vec![1]);
        assert_eq!(plain[2].rows, vec![0]);
        assert!((plain[0].weights[0] - e(1.0) / z0).abs() < 1e-6);
        assert!((plain[0].weights[1] - 1.0 / z1).abs() < 1e-6);
        assert!((plain[1].weights[0] - e(3.0) / z1).abs() < 1e-6);
        assert!((plain[2].weights[0] - e(2.0) / z0).abs() < 1e-6);
        let normalized = route(
            &scores,
            3,
            Routing {
                top_k: 2,
                normalize: true,
            },
        )?;
        let sum0 = normalized[0].weights[0] + normalized[2].weights[0];
        let sum1 = normalized[0].weights[1] + normalized[1].weights[0];
        assert!((sum0 - 1.0).abs() < 1e-6 && (sum1 - 1.0).abs() < 1e-6);
        assert!(route(
            &scores,
            3,
            Routing {
                top_k: 4,
                normalize: false
            }
        )
        .is_err());
        Ok(())
    }
}
