//! The decoder-only transformer every supported family is an instance of. Families differ
//! only in their `DecoderSpec` (built from config.json by `llama.rs`, `gemma3.rs`, `phi3.rs`):
//! biases, fused projections, q/k norms, norm placement, activation, rope per layer type,
//! sliding windows, scales and soft-capping. Stateless: KV lives in the `PagedKvCache`,
//! positions come from the `BatchInput`.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{HfConfig, LayerType, RopeConfig};
use super::{Model, ModelConfig};
use crate::compute::attention::{self, AttentionMeta, AttentionOpts, HeadDims, HeadNorms, Projected};
use crate::compute::batch::BatchInput;
use crate::compute::experts::{Routing, SparseMoe};
use crate::compute::layers::{Activation, Embed, GatedMlp, Linear, RmsNorm, Rotary, RotaryAtPositions};
use crate::compute::paged_kv::{LayerKv, PagedKvCache};
use crate::formats::layers::{ExpertProjection, ExpertShape};
use crate::formats::source::WeightSource;
use crate::formats::{LoadError, LoadProgress};

/// Where a layer's norms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + attn(norm(x))`, `x + mlp(norm(x))` (Llama, Qwen, Phi-3).
    Pre,
    /// Gemma: also a norm on each block's output (`post_attention_layernorm`,
    /// `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    Sandwich,
}

/// Everything that distinguishes one family's decoder from another's.
#[derive(Clone, Debug)]
pub struct DecoderSpec {
    /// Residual width.
    pub hidden: usize,
    /// Head layout.
    pub dims: HeadDims,
    /// Decoder layers.
    pub num_layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RMSNorm scales by `1 + w` (Gemma).
    pub norm_unit_offset: bool,
    /// Norm arrangement.
    pub norm_placement: NormPlacement,
    /// q/k/v projections carry biases.
    pub qkv_bias: bool,
    /// o_proj carries a bias.
    pub o_bias: bool,
    /// One `qkv_proj` (rows: q, k, v) instead of three projections.
    pub fused_qkv: bool,
    /// RMSNorm over each head of q and k before rope (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// The MLP (of every layer, or of the layers `moe` leaves dense).
    pub mlp: MlpSpec,
    /// The mixture-of-experts block and the layers that use it instead of the MLP.
    pub moe: Option<MoeSpec>,
    /// Embeddings are multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// Attention score multiplier.
    pub attn_scale: f64,
    /// Attention score soft-capping.
    pub attn_softcap: Option<f64>,
    /// Final logit soft-capping.
    pub final_softcap: Option<f64>,
    /// Attention type of every layer.
    pub layer_types: Vec<LayerType>,
    /// Rope of full-attention layers.
    pub rope_full: RopeConfig,
    /// Rope of sliding-window layers when it differs from `rope_full` (Gemma 3).
    pub rope_sliding: Option<RopeConfig>,
    /// Window of sliding layers.
    pub sliding_window: Option<usize>,
    /// lm_head is the embedding matrix.
    pub tie_embeddings: bool,
    /// Rows of the rope tables.
    pub max_positions: usize,
    /// Rotate interleaved pairs (llama.cpp's permuted `llama` weights) instead of halves.
    pub rope_interleaved: bool,
    /// Tensor name prefix of the decoder (`model`, or `model.language_model` …).
    pub prefix: String,
}

impl DecoderSpec {
    /// The Llama-style spec every family starts from: pre-norm, separate projections,
    /// `head_dim^-0.5` scaling, one rope, full attention everywhere.
    pub fn base(cfg: &HfConfig, tie_by_default: bool) -> std::result::Result<Self, LoadError> {
        let dims = HeadDims {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
        };
        let activation = Activation::from_name(cfg.activation()).ok_or_else(|| {
            LoadError::Unsupported(format!(
                "activation `{}` (supported: silu, gelu_pytorch_tanh)",
                cfg.activation()
            ))
        })?;
        Ok(Self {
            hidden: cfg.hidden_size,
            dims,
            num_layers: cfg.num_hidden_layers,
            vocab: cfg.vocab_size,
            rms_eps: cfg.rms_norm_eps,
            norm_unit_offset: false,
            norm_placement: NormPlacement::Pre,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            fused_qkv: false,
            qk_norm: false,
            mlp: MlpSpec {
                hidden: cfg.hidden_size,
                intermediate: cfg.intermediate_size,
                bias: cfg.mlp_bias,
                fused_gate_up: false,
                names: MlpNames::HF,
                activation,
            },
            moe: None,
            embed_scale: None,
            attn_scale: 1.0 / (dims.head_dim as f64).sqrt(),
            attn_softcap: cfg.attn_logit_softcapping,
            final_softcap: cfg.final_logit_softcapping,
            layer_types: vec![LayerType::Full; cfg.num_hidden_layers],
            rope_full: cfg.rope(LayerType::Full)?,
            rope_sliding: None,
            sliding_window: None,
            tie_embeddings: cfg.tie_word_embeddings.unwrap_or(tie_by_default),
            max_positions: cfg.max_position_embeddings,
            rope_interleaved: false,
            prefix: "model".into(),
        })
    }

    /// Makes every layer attend through `cfg.sliding_window` when the config sets one.
    pub fn with_uniform_sliding_window(mut self, cfg: &HfConfig) -> Self {
        if let Some(w) = cfg.sliding_window {
            self.layer_types = vec![LayerType::Sliding; self.num_layers];
            self.sliding_window = Some(w);
        }
        self
    }
}

/// The q, k and v projections: three layers, or (dense or GGUF weights on CUDA) one layer whose
/// output is `[q | k | v]`, one matmul launch instead of three.
#[derive(Debug)]
enum QkvProjection {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused { qkv: Linear, widths: [usize; 3] },
}

impl QkvProjection {
    fn forward(&self, x: &Tensor) -> Result<Projected<'_>> {
        match self {
            Self::Separate { q, k, v } => Ok(Projected {
                q: q.forward(x)?,
                k: k.forward(x)?,
                v: v.forward(x)?,
                bias: None,
                norms: None,
            }),
            Self::Fused { qkv, widths: [q, k, v] } => {
                let (all, bias) = qkv.forward_unbiased(x)?;
                Ok(Projected {
                    q: all.narrow(1, 0, *q)?,
                    k: all.narrow(1, *q, *k)?,
                    v: all.narrow(1, q + k, *v)?,
                    bias,
                    norms: None,
                })
            }
        }
    }
}

#[derive(Debug)]
struct Attention {
    qkv: QkvProjection,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    opts: AttentionOpts,
    sliding: bool,
}

impl Attention {
    fn load(vb: WeightSource, spec: &DecoderSpec, layer: LayerType) -> Result<Self> {
        let d = spec.dims;
        let (q_out, kv_out) = (d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim);
        let h = spec.hidden;
        let (q_proj, k_proj, v_proj) = if spec.fused_qkv {
            let fused = vb.pp("qkv_proj").linear(h, q_out + 2 * kv_out, spec.qkv_bias)?;
            let mut p = fused.split_rows(&[q_out, kv_out, kv_out])?.into_iter();
            let mut next = || p.next().expect("three parts");
            (next(), next(), next())
        } else {
            (
                vb.pp("q_proj").linear(h, q_out, spec.qkv_bias)?,
                vb.pp("k_proj").linear(h, kv_out, spec.qkv_bias)?,
                vb.pp("v_proj").linear(h, kv_out, spec.qkv_bias)?,
            )
        };
        let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            spec.qk_norm
                .then(|| vb.pp(name).rms_norm(d.head_dim, spec.rms_eps, spec.norm_unit_offset))
                .transpose()
        };
        let fused = Linear::fuse(&[&q_proj, &k_proj, &v_proj], vb.device())?;
        let qkv = match fused {
            Some(qkv) => QkvProjection::Fused {
                qkv,
                widths: [q_out, kv_out, kv_out],
            },
            None => QkvProjection::Separate {
                q: q_proj,
                k: k_proj,
                v: v_proj,
            },
        };
        let sliding = layer == LayerType::Sliding;
        Ok(Self {
            qkv,
            o_proj: vb.pp("o_proj").linear(q_out, h, spec.o_bias)?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            opts: AttentionOpts {
                scale: spec.attn_scale,
                window: if sliding { spec.sliding_window } else { None },
                softcap: spec.attn_softcap,
            },
            sliding,
        })
    }

    fn forward(&self, x: &Tensor, rope: &RotaryAtPositions, kv: &mut LayerKv, meta: &AttentionMeta) -> Result<Tensor> {
        // 1) project, 2) bias, per-head norms, rope and the KV write, 3) paged attention,
        // 4) output projection.
        let mut projected = self.qkv.forward(x)?;
        projected.norms = match (&self.q_norm, &self.k_norm) {
            (Some(q), Some(k)) => Some(HeadNorms { q, k }),
            _ => None,
        };
        let q = attention::store_kv(&projected, rope, kv, meta)?;
        let o = attention::attend(&q, kv, meta, self.opts)?;
        self.o_proj.forward(&o)
    }
}

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
    /// The block's name in a layer (`mlp`, Mixtral's `block_sparse_moe`); the router is
    /// `<block>.gate`, expert `e` is `<block>.experts.<e>`.
    pub block: &'static str,
    /// Per layer: sparse (true) or the dense MLP.
    pub sparse_layers: Vec<bool>,
}

/// Loads `gate_proj` + `up_proj` (or `gate_up_proj`) and `down_proj` under `vb`, the gate and
/// up projections fused into one product where that pays (`Linear::fuse`).
fn load_mlp(vb: WeightSource, spec: MlpSpec) -> Result<GatedMlp> {
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

/// Loads a layer's mixture-of-experts block under `vb` (the layer).
fn load_moe(vb: WeightSource, spec: &MoeSpec) -> Result<SparseMoe> {
    let block = vb.pp(spec.block);
    let (h, i, names) = (spec.expert.hidden, spec.expert.intermediate, spec.expert.names);
    let router = block.pp("gate").linear(h, spec.num_experts, false)?;
    let shape = |in_dim, out_dim| ExpertShape {
        experts: spec.num_experts,
        in_dim,
        out_dim,
    };
    let gates = block.expert_linears(names.gate, ExpertProjection::Gate, shape(h, i))?;
    let ups = block.expert_linears(names.up, ExpertProjection::Up, shape(h, i))?;
    let downs = block.expert_linears(names.down, ExpertProjection::Down, shape(i, h))?;
    let experts = gates
        .into_iter()
        .zip(ups)
        .zip(downs)
        .map(|((gate, up), down)| gated_mlp([gate, up, down], spec.expert, block.device()))
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe::new(router, experts, spec.routing))
}

/// A layer's feed-forward block.
#[derive(Debug)]
enum FeedForward {
    Dense(GatedMlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    fn load(vb: WeightSource, spec: &DecoderSpec, layer: usize) -> Result<Self> {
        match &spec.moe {
            Some(moe) if moe.sparse_layers[layer] => Ok(Self::Sparse(load_moe(vb, moe)?)),
            _ => Ok(Self::Dense(load_mlp(vb.pp("mlp"), spec.mlp)?)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x),
        }
    }
}

#[derive(Debug)]
struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Attention,
    attn_out_norm: Option<RmsNorm>,
    mlp_norm: RmsNorm,
    mlp: FeedForward,
    mlp_out_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    fn load(vb: WeightSource, spec: &DecoderSpec, index: usize, layer: LayerType) -> Result<Self> {
        let norm = |name: &str| vb.pp(name).rms_norm(spec.hidden, spec.rms_eps, spec.norm_unit_offset);
        let sandwich = spec.norm_placement == NormPlacement::Sandwich;
        Ok(Self {
            attn_norm: norm("input_layernorm")?,
            attn: Attention::load(vb.pp("self_attn"), spec, layer)?,
            attn_out_norm: sandwich.then(|| norm("post_attention_layernorm")).transpose()?,
            mlp_norm: norm(if sandwich {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            })?,
            mlp: FeedForward::load(vb.clone(), spec, index)?,
            mlp_out_norm: sandwich.then(|| norm("post_feedforward_layernorm")).transpose()?,
        })
    }

    /// The residual stream arrives as `x` plus the previous layer's not yet added output
    /// `delta`, and leaves the same way: each residual add runs fused into the norm after it.
    fn forward(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        rope: &RotaryAtPositions,
        kv: &mut LayerKv,
        meta: &AttentionMeta,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = self.attn_norm.add_forward(x, delta)?;
        let mut h = self.attn.forward(&normed, rope, kv, meta)?;
        if let Some(n) = &self.attn_out_norm {
            h = n.forward(&h)?;
        }
        let (x, normed) = self.mlp_norm.add_forward(&x, Some(&h))?;
        let mut h = self.mlp.forward(&normed)?;
        if let Some(n) = &self.mlp_out_norm {
            h = n.forward(&h)?;
        }
        Ok((x, h))
    }
}

/// A loaded decoder-only model of any supported family.
#[derive(Debug)]
pub struct Decoder {
    embed_tokens: Embed,
    embed_scale: Option<f64>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    final_softcap: Option<f64>,
    rope_full: Rotary,
    rope_sliding: Option<Rotary>,
    windows: Vec<Option<usize>>,
    dims: HeadDims,
    config: ModelConfig,
}

impl Decoder {
    /// Builds the model from a family's spec and weights under `vb` (HF tensor names).
    pub fn load(vb: WeightSource, spec: &DecoderSpec, config: ModelConfig, progress: &LoadProgress) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let m = vb.pp(&spec.prefix);
        let embed_tokens = m.pp("embed_tokens").embed(spec.vocab, spec.hidden)?;
        progress.set_length(spec.num_layers as u64);
        let layers = spec
            .layer_types
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let layer = DecoderLayer::load(m.pp(format!("layers.{i}")), spec, i, kind);
                progress.inc();
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if spec.tie_embeddings || !vb.contains_tensor("lm_head.weight") {
            embed_tokens.as_linear()
        } else {
            vb.pp("lm_head").linear(spec.hidden, spec.vocab, false)?
        };
        let mut windows: Vec<Option<usize>> = layers.iter().map(|l| l.attn.opts.window).collect();
        windows.sort_unstable();
        windows.dedup();
        Ok(Self {
            embed_tokens,
            embed_scale: spec.embed_scale,
            layers,
            norm: m
                .pp("norm")
                .rms_norm(spec.hidden, spec.rms_eps, spec.norm_unit_offset)?,
            lm_head,
            final_softcap: spec.final_softcap,
            rope_full: Rotary::new(spec.rope_full.tables(spec.max_positions), dtype, &device)?
                .interleaved(spec.rope_interleaved),
            rope_sliding: spec
                .rope_sliding
                .as_ref()
                .map(|r| {
                    Rotary::new(r.tables(spec.max_positions), dtype, &device)
                        .map(|r| r.interleaved(spec.rope_interleaved))
                })
                .transpose()?,
            windows,
            dims: spec.dims,
            config,
        })
    }
}

impl Model for Decoder {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> Result<Tensor> {
        let residual = self.layers_forward(batch, kv)?;
        self.head(&residual, &batch.logits_rows)
    }

    fn forward_hidden(
        &self,
        batch: &BatchInput,
        hidden_rows: &Tensor,
        kv: &mut PagedKvCache,
    ) -> Result<(Tensor, Tensor)> {
        let residual = self.layers_forward(batch, kv)?;
        let hidden = residual.normed(&self.norm, hidden_rows)?.to_dtype(DType::F32)?;
        Ok((self.head(&residual, &batch.logits_rows)?, hidden))
    }
}

/// The residual stream after the last layer: `x` plus the last layer's pending `delta` (the
/// add is fused into the final norm).
struct Residual {
    x: Tensor,
    delta: Option<Tensor>,
}

impl Residual {
    /// Final-normed hidden states of `rows`.
    fn normed(&self, norm: &RmsNorm, rows: &Tensor) -> Result<Tensor> {
        let pick = |t: &Tensor| t.index_select(rows, 0);
        let delta = self.delta.as_ref().map(pick).transpose()?;
        let (_, x) = norm.add_forward(&pick(&self.x)?, delta.as_ref())?;
        Ok(x)
    }
}

impl Decoder {
    /// Final norm and lm_head on the sampling rows only (none: an empty `[0, vocab]`).
    fn head(&self, residual: &Residual, rows: &Tensor) -> Result<Tensor> {
        if rows.dim(0)? == 0 {
            return Tensor::zeros((0, self.config.vocab_size), DType::F32, residual.x.device());
        }
        let x = residual.normed(&self.norm, rows)?;
        let mut logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    /// 1) embeds every scheduled token, 2) per-forward rope rows and attention metadata,
    /// 3) the decoder layers.
    fn layers_forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> Result<Residual> {
        let mut x = self.embed_tokens.forward(&batch.token_ids)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let dtype = x.dtype();
        let rope_full = self.rope_full.at(&batch.positions)?;
        let rope_sliding = self.rope_sliding.as_ref().map(|r| r.at(&batch.positions)).transpose()?;
        let meta = AttentionMeta::new(batch, self.dims, &self.windows, dtype)?;
        let mut delta = None;
        for (layer, layer_kv) in self.layers.iter().zip(kv.layers_mut()) {
            let rope = match &rope_sliding {
                Some(sliding) if layer.attn.sliding => sliding,
                _ => &rope_full,
            };
            let (next, h) = layer.forward(&x, delta.as_ref(), rope, layer_kv, &meta)?;
            (x, delta) = (next, Some(h));
        }
        Ok(Residual { x, delta })
    }
}
