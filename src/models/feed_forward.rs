//! The feed-forward blocks of a decoder layer as the families name and shape them: the gated
//! MLP (`MlpSpec`) and the mixture-of-experts block (`MoeSpec`) in each layout a family stores
//! it (`MoeLayout`), loaded from any weight format into compute's `GatedMlp` / `SparseMoe`.

use candle_core::{DType, Device, Result};

use crate::compute::experts::{Routing, SparseMoe};
use crate::compute::layers::{Activation, GatedMlp, Linear, RmsNorm};
use crate::formats::layers::{ExpertProjection, ExpertShape};
use crate::formats::source::WeightSource;

/// Shape and naming of a gated MLP.
#[derive(Clone, Copy, Debug)]
pub struct MlpSpec {
    /// Residual width.
    pub hidden: usize,
    /// Inner width.
    pub intermediate: usize,
    /// Projections carry biases.
    pub bias: bool,
    /// One `gate_up_proj` (rows: gate, then up) instead of two projections.
    pub fused_gate_up: bool,
    /// Tensor names of the projections.
    pub names: MlpNames,
    /// Gate activation.
    pub activation: Activation,
}

/// The tensor names of a gated MLP's projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpNames {
    /// The gate projection (or, with `fused_gate_up`, the fused one).
    pub gate: &'static str,
    /// The up projection.
    pub up: &'static str,
    /// The down projection.
    pub down: &'static str,
}

impl MlpNames {
    /// Hugging Face's usual names (`gate_up_proj` when fused).
    pub const HF: MlpNames = MlpNames {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
    /// Mixtral's experts: `w1` gate, `w3` up, `w2` down.
    pub const MIXTRAL: MlpNames = MlpNames {
        gate: "w1",
        up: "w3",
        down: "w2",
    };
}

/// A sparse mixture-of-experts block (`compute::experts::SparseMoe`): its shape, routing,
/// tensor names and the layers that have one.
#[derive(Clone, Debug)]
pub struct MoeSpec {
    /// Experts in each sparse layer.
    pub num_experts: usize,
    /// How the router's scores pick and weigh experts.
    pub routing: Routing,
    /// Each expert's MLP (hidden, inner width, names, activation).
    pub expert: MlpSpec,
    /// Where the block sits and how its tensors are named.
    pub layout: MoeLayout,
    /// Per layer: sparse (true) or the dense MLP.
    pub sparse_layers: Vec<bool>,
}

/// Where a mixture-of-experts block sits in a layer and how its tensors are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeLayout {
    /// The block replaces the dense MLP: the router is `<block>.gate`, expert `e` is
    /// `<block>.experts.<e>` (`mlp`, Mixtral's `block_sparse_moe`).
    Replacing {
        /// The block's name in a layer.
        block: &'static str,
    },
    /// Gemma 4: the block runs beside the layer's dense MLP, each between norms of its own
    /// (`post_feedforward_layernorm_1` after the MLP, `pre_`/`post_feedforward_layernorm_2`
    /// around the experts), their outputs summed. The router (`router.proj`) reads the layer's
    /// residual through a norm scaled by `router.scale · hidden^-0.5` and weighs each kept
    /// expert by `router.per_expert_scale`; the experts are stacked `experts.gate_up_proj` and
    /// `experts.down_proj`.
    BesideDense,
    /// gpt-oss: the block `mlp` with a biased `router`; every expert projection has a bias.
    /// transformers stacks the experts as `experts.gate_up_proj` `[experts, hidden, 2·inner]`
    /// (gate and up in alternate columns) and `experts.down_proj` `[experts, inner, hidden]`,
    /// biases beside (`…_bias`); GGUF has them per expert as `experts.<e>.<gate|up|down>_proj`
    /// and mlx-lm stacked as `experts.<gate|up|down>_proj` (`[experts, out, in]`).
    Interleaved,
}

/// Loads `gate_proj` + `up_proj` (or `gate_up_proj`) and `down_proj` under `vb`, the gate and
/// up projections fused into one product where that pays (`Linear::fuse`).
pub(super) fn load_mlp(vb: WeightSource, spec: MlpSpec) -> Result<GatedMlp> {
    let (h, i) = (spec.hidden, spec.intermediate);
    let names = spec.names;
    let (gate, up) = if spec.fused_gate_up {
        let fused = vb.pp("gate_up_proj").linear(h, 2 * i, spec.bias)?;
        let mut parts = fused.split_rows(&[i, i])?.into_iter();
        let gate = parts.next().expect("two parts");
        (gate, parts.next().expect("two parts"))
    } else {
        (
            vb.pp(names.gate).linear(h, i, spec.bias)?,
            vb.pp(names.up).linear(h, i, spec.bias)?,
        )
    };
    let down = vb.pp(names.down).linear(i, h, spec.bias)?;
    gated_mlp([gate, up, down], spec, vb.device())
}

/// The MLP over `[gate, up, down]`, gate and up fused into one product where that pays.
fn gated_mlp([gate, up, down]: [Linear; 3], spec: MlpSpec, device: &Device) -> Result<GatedMlp> {
    Ok(match Linear::fuse(&[&gate, &up], device)? {
        Some(gate_up) => GatedMlp::fused(gate_up, spec.intermediate, down, spec.activation),
        None => GatedMlp::separate(gate, up, down, spec.activation),
    })
}

/// Loads a layer's mixture-of-experts block under `vb` (the layer), laid out as `block` names
/// it.
pub(super) fn load_moe(vb: &WeightSource, spec: &MoeSpec, block: &str) -> Result<SparseMoe> {
    let block = vb.pp(block);
    let router = block.pp("gate").linear(spec.expert.hidden, spec.num_experts, false)?;
    SparseMoe::new(router, expert_mlps(&block, spec)?, spec.routing)
}

/// The experts under `block`, each a gated MLP of separate gate, up and down projections named
/// as `spec.expert.names` says (per-expert tensors, or mlx-lm's stacked `switch_mlp` /
/// `switch_glu`; `WeightSource::expert_linears`).
fn expert_mlps(block: &WeightSource, spec: &MoeSpec) -> Result<Vec<GatedMlp>> {
    let (h, i, names) = (spec.expert.hidden, spec.expert.intermediate, spec.expert.names);
    let shape = |in_dim, out_dim| ExpertShape {
        experts: spec.num_experts,
        in_dim,
        out_dim,
    };
    let gates = block.expert_linears(names.gate, ExpertProjection::Gate, shape(h, i))?;
    let ups = block.expert_linears(names.up, ExpertProjection::Up, shape(h, i))?;
    let downs = block.expert_linears(names.down, ExpertProjection::Down, shape(i, h))?;
    gates
        .into_iter()
        .zip(ups)
        .zip(downs)
        .map(|((gate, up), down)| gated_mlp([gate, up, down], spec.expert, block.device()))
        .collect()
}

/// Loads Gemma 4's router and stacked experts under `vb` (the layer): transformers'
/// `experts.gate_up_proj` / `experts.down_proj`, GGUF's per-expert slices of them, or mlx-lm's
/// `experts.switch_glu`.
pub(super) fn load_moe_beside_dense(vb: &WeightSource, spec: &MoeSpec, rms_eps: f64) -> Result<SparseMoe> {
    let (h, i, e) = (spec.expert.hidden, spec.expert.intermediate, spec.num_experts);
    let router = vb.pp("router");
    let scale = (router.get(h, "scale")?.to_dtype(DType::F32)? * (h as f64).powf(-0.5))?;
    let expert_scales = router.get(e, "per_expert_scale")?.to_dtype(DType::F32)?.to_vec1()?;
    let experts = vb.pp("experts");
    let shape = |in_dim, out_dim| ExpertShape {
        experts: e,
        in_dim,
        out_dim,
    };
    let mlps = if experts.contains_tensor("gate_up_proj") {
        let gate_ups = experts.stacked_expert_linears("gate_up_proj", shape(h, 2 * i))?;
        let downs = experts.stacked_expert_linears("down_proj", shape(i, h))?;
        gate_ups
            .into_iter()
            .zip(downs)
            .map(|(gate_up, down)| Ok(GatedMlp::fused(gate_up, i, down, spec.expert.activation)))
            .collect::<Result<Vec<_>>>()?
    } else if experts.contains_tensor("0.gate_up_proj.weight") {
        // GGUF's `ffn_gate_up_exps` / `ffn_down_exps`, one expert at a time.
        (0..e)
            .map(|expert| {
                let x = experts.pp(expert);
                let gate_up = x.pp("gate_up_proj").linear(h, 2 * i, false)?;
                let down = x.pp("down_proj").linear(i, h, false)?;
                Ok(GatedMlp::fused(gate_up, i, down, spec.expert.activation))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        // mlx-lm's `experts.switch_glu.{gate,up,down}_proj`.
        expert_mlps(&experts, spec)?
    };
    SparseMoe::new(router.pp("proj").linear(h, e, false)?, mlps, spec.routing)?
        .with_router_norm(RmsNorm::new(scale.to_dtype(vb.dtype())?, rms_eps, false)?)
        .with_expert_scales(expert_scales)
}

/// Loads gpt-oss's router and experts under `vb` (the layer), as `MoeLayout::Interleaved`
/// describes them.
pub(super) fn load_interleaved_moe(vb: &WeightSource, spec: &MoeSpec) -> Result<SparseMoe> {
    let (h, i, e) = (spec.expert.hidden, spec.expert.intermediate, spec.num_experts);
    let block = vb.pp("mlp");
    let experts = block.pp("experts");
    let device = vb.device();
    let mlps = if experts.contains_tensor("gate_up_proj") {
        let gate_up = experts.get((e, h, 2 * i), "gate_up_proj")?;
        let gate_up_bias = experts.get((e, 2 * i), "gate_up_proj_bias")?;
        let down = experts.get((e, i, h), "down_proj")?;
        let down_bias = experts.get((e, h), "down_proj_bias")?;
        (0..e)
            .map(|x| {
                // Output j of the gate is column 2j, of up column 2j + 1.
                let weights = gate_up.get(x)?.t()?.contiguous()?.reshape((i, 2, h))?;
                let biases = gate_up_bias.get(x)?.reshape((i, 2))?;
                let half = |k: usize| {
                    vb.dense_linear(
                        weights.narrow(1, k, 1)?.squeeze(1)?.contiguous()?,
                        Some(biases.narrow(1, k, 1)?.squeeze(1)?.contiguous()?),
                    )
                };
                let down = vb.dense_linear(down.get(x)?.t()?.contiguous()?, Some(down_bias.get(x)?))?;
                gated_mlp([half(0)?, half(1)?, down], spec.expert, device)
            })
            .collect::<Result<Vec<_>>>()?
    } else if experts.contains_tensor("gate_up_proj_blocks") {
        // openai/gpt-oss-*: MXFP4 experts, rows = outputs, gate and up rows alternating.
        let gate_up = experts.mxfp4_stacked("gate_up_proj", e, 2 * i, h)?;
        let gate_up_bias = experts.get((e, 2 * i), "gate_up_proj_bias")?;
        let down = experts.mxfp4_stacked("down_proj", e, h, i)?;
        let down_bias = experts.get((e, h), "down_proj_bias")?;
        gate_up
            .into_iter()
            .zip(down)
            .enumerate()
            .map(|(x, (gate_up, down))| {
                let biases = gate_up_bias.get(x)?.reshape((i, 2))?;
                let half = |k: usize| {
                    let bias = biases.narrow(1, k, 1)?.squeeze(1)?.contiguous()?;
                    experts.mxfp4_linear(gate_up.every_nth_row(k, 2)?, h, i, Some(bias))
                };
                let down = experts.mxfp4_linear(down, i, h, Some(down_bias.get(x)?))?;
                gated_mlp([half(0)?, half(1)?, down], spec.expert, device)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let shape = |in_dim, out_dim| ExpertShape {
            experts: e,
            in_dim,
            out_dim,
        };
        let projections = |name: &str, in_dim, out_dim| -> Result<Vec<Linear>> {
            if experts.contains_tensor(&format!("{name}.weight")) {
                // mlx-lm's `SwitchGLU`.
                experts.pp(name).stacked_linears(shape(in_dim, out_dim), true)
            } else {
                // GGUF's `ffn_<gate|up|down>_exps`, one expert at a time.
                (0..e)
                    .map(|x| experts.pp(x).pp(name).linear(in_dim, out_dim, true))
                    .collect()
            }
        };
        let gates = projections("gate_proj", h, i)?;
        let ups = projections("up_proj", h, i)?;
        let downs = projections("down_proj", i, h)?;
        gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((gate, up), down)| gated_mlp([gate, up, down], spec.expert, device))
            .collect::<Result<Vec<_>>>()?
    };
    SparseMoe::new(block.pp("router").linear(h, e, true)?, mlps, spec.routing)
}
