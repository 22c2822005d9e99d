//! The decoder-only transformer every supported family is an instance of. Families differ
//! only in their `DecoderSpec` (built from config.json by `llama.rs`, `gemma3.rs`, `gemma4.rs`,
//! `phi3.rs`): biases, fused projections, q/k/v norms, norm placement, activation, rope and
//! head layout per layer type, sliding windows, scales and soft-capping, mixtures of experts,
//! layers that read an earlier layer's KV, per-layer input embeddings. Stateless: KV lives in
//! the `PagedKvCache`, positions come from the `BatchInput`.

use candle_core::{DType, Result, Tensor};

use super::config::{HfConfig, LayerType, RopeConfig};
use super::feed_forward::{
    load_interleaved_moe, load_mlp, load_moe, load_moe_beside_dense, MlpNames, MlpSpec, MoeLayout, MoeSpec,
};
use super::vision::VisionEncoder;
use super::{Model, ModelConfig};
use crate::compute::attention::{self, AttentionMeta, AttentionOpts, HeadDims, HeadNorms, Projected};
use crate::compute::batch::BatchInput;
use crate::compute::experts::SparseMoe;
use crate::compute::layers::{Activation, Embed, GatedMlp, Linear, RmsNorm, Rotary, RotaryAtPositions};
use crate::compute::paged_kv::{LayerKv, PagedKvCache};
use crate::compute::Numerics;
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
    /// Each layer has a learned sink logit per query head (`self_attn.sinks`, gpt-oss).
    pub attn_sinks: bool,
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
    /// Head layout of full-attention layers where it differs from `dims` (Gemma 4).
    pub global_dims: Option<HeadDims>,
    /// Full-attention layers have no v projection: their values are the keys' projection
    /// before norm and rope (Gemma 4's `attention_k_eq_v`).
    pub global_values_are_keys: bool,
    /// RMSNorm without scale over each head of v (Gemma 4).
    pub v_norm: bool,
    /// Per layer: the earlier layer whose KV it reads instead of keeping its own (Gemma 4's
    /// `num_kv_shared_layers`); empty when every layer keeps KV.
    pub kv_source: Vec<Option<usize>>,
    /// Layers that read another layer's KV have MLPs twice as wide (Gemma 4).
    pub double_wide_shared_mlp: bool,
    /// Each layer's output is multiplied by its `layer_scalar` (Gemma 4).
    pub layer_scalar: bool,
    /// Per-layer input embeddings (Gemma 4's PLE).
    pub per_layer_input: Option<PerLayerInputSpec>,
}

/// Gemma 4's per-layer input embeddings: a table of `vocab` rows of `num_layers · width`
/// values (one slice per layer) and a projection of the embeddings to the same width, mixed
/// into each layer's output through a gate.
#[derive(Clone, Copy, Debug)]
pub struct PerLayerInputSpec {
    /// Each layer's slice.
    pub width: usize,
    /// Rows of the table.
    pub vocab: usize,
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
            attn_sinks: false,
            final_softcap: cfg.final_logit_softcapping,
            layer_types: vec![LayerType::Full; cfg.num_hidden_layers],
            rope_full: cfg.rope(LayerType::Full)?,
            rope_sliding: None,
            sliding_window: None,
            tie_embeddings: cfg.tie_word_embeddings.unwrap_or(tie_by_default),
            max_positions: cfg.max_position_embeddings,
            rope_interleaved: false,
            prefix: "model".into(),
            global_dims: None,
            global_values_are_keys: false,
            v_norm: false,
            kv_source: Vec::new(),
            double_wide_shared_mlp: false,
            layer_scalar: false,
            per_layer_input: None,
        })
    }

    /// The head layout of a layer of type `kind`.
    pub fn dims_of(&self, kind: LayerType) -> HeadDims {
        match (kind, self.global_dims) {
            (LayerType::Full, Some(global)) => global,
            _ => self.dims,
        }
    }

    /// The earlier layer whose KV layer `index` reads, if it keeps none of its own.
    fn kv_source_of(&self, index: usize) -> Option<usize> {
        self.kv_source.get(index).copied().flatten()
    }

    /// Which KV cache layer each decoder layer uses, and the width of every cache layer: layers
    /// that read shared KV use their source's. A source must be an earlier layer of the same
    /// type that keeps its own KV.
    fn kv_plan(&self) -> Result<(Vec<usize>, Vec<usize>)> {
        let mut cache_layer = Vec::with_capacity(self.num_layers);
        let mut widths = Vec::new();
        for (i, &kind) in self.layer_types.iter().enumerate() {
            match self.kv_source_of(i) {
                Some(src) => {
                    if src >= i || self.layer_types[src] != kind || self.kv_source_of(src).is_some() {
                        candle_core::bail!("layer {i} cannot read the KV of layer {src}");
                    }
                    cache_layer.push(cache_layer[src]);
                }
                None => {
                    let d = self.dims_of(kind);
                    cache_layer.push(widths.len());
                    widths.push(d.num_kv_heads * d.head_dim);
                }
            }
        }
        Ok((cache_layer, widths))
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
/// output is `[q | k | v]`, one matmul launch instead of three; Gemma 4's layers whose values
/// are their keys; and the queries alone of a layer that reads another layer's KV.
#[derive(Debug)]
enum QkvProjection {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused { qkv: Linear, widths: [usize; 3] },
    KeysAsValues { q: Linear, k: Linear },
    QueriesOnly { q: Linear },
}

impl QkvProjection {
    /// q, k and v of a layer that keeps KV.
    fn forward(&self, x: &Tensor) -> Result<Projected<'_>> {
        match self {
            Self::KeysAsValues { q, k } => {
                let k = k.forward(x)?;
                Ok(Projected {
                    q: q.forward(x)?,
                    v: k.clone(),
                    k,
                    bias: None,
                    norms: None,
                })
            }
            Self::QueriesOnly { .. } => candle_core::bail!("a layer reading shared KV projects no keys"),
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
    v_norm: Option<RmsNorm>,
    opts: AttentionOpts,
    sliding: bool,
    dims: HeadDims,
}

impl Attention {
    fn load(vb: WeightSource, spec: &DecoderSpec, index: usize, layer: LayerType) -> Result<Self> {
        let d = spec.dims_of(layer);
        let (q_out, kv_out) = (d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim);
        let h = spec.hidden;
        let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            spec.qk_norm
                .then(|| vb.pp(name).rms_norm(d.head_dim, spec.rms_eps, spec.norm_unit_offset))
                .transpose()
        };
        let shared = spec.kv_source_of(index).is_some();
        let v_norm = (spec.v_norm && !shared)
            .then(|| RmsNorm::new(Tensor::ones(d.head_dim, vb.dtype(), vb.device())?, spec.rms_eps, false))
            .transpose()?;
        if v_norm.is_some() && spec.qkv_bias {
            candle_core::bail!("a value norm with q/k/v biases is not supported");
        }
        let sliding = layer == LayerType::Sliding;
        let qkv = if shared {
            QkvProjection::QueriesOnly {
                q: vb.pp("q_proj").linear(h, q_out, spec.qkv_bias)?,
            }
        } else if spec.global_values_are_keys && !sliding {
            QkvProjection::KeysAsValues {
                q: vb.pp("q_proj").linear(h, q_out, spec.qkv_bias)?,
                k: vb.pp("k_proj").linear(h, kv_out, spec.qkv_bias)?,
            }
        } else {
            Self::load_qkv(&vb, spec, q_out, kv_out)?
        };
        Ok(Self {
            qkv,
            o_proj: vb.pp("o_proj").linear(q_out, h, spec.o_bias)?,
            q_norm: head_norm("q_norm")?,
            k_norm: if shared { None } else { head_norm("k_norm")? },
            v_norm,
            opts: AttentionOpts {
                scale: spec.attn_scale,
                window: if sliding { spec.sliding_window } else { None },
                softcap: spec.attn_softcap,
                sinks: spec
                    .attn_sinks
                    .then(|| vb.get(d.num_heads, "sinks")?.to_dtype(DType::F32))
                    .transpose()?,
            },
            sliding,
            dims: d,
        })
    }

    /// Separate or fused q, k and v projections, fused into one product where that pays.
    fn load_qkv(vb: &WeightSource, spec: &DecoderSpec, q_out: usize, kv_out: usize) -> Result<QkvProjection> {
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
        let fused = Linear::fuse(&[&q_proj, &k_proj, &v_proj], vb.device())?;
        Ok(match fused {
            Some(qkv) => QkvProjection::Fused {
                qkv,
                widths: [q_out, kv_out, kv_out],
            },
            None => QkvProjection::Separate {
                q: q_proj,
                k: k_proj,
                v: v_proj,
            },
        })
    }

    fn forward(&self, x: &Tensor, rope: &RotaryAtPositions, kv: &mut LayerKv, meta: &AttentionMeta) -> Result<Tensor> {
        // 1) project, 2) bias, per-head norms, rope and the KV write (a layer reading shared
        // KV: its queries only), 3) paged attention, 4) output projection.
        let q = if let QkvProjection::QueriesOnly { q } = &self.qkv {
            attention::queries(&q.forward(x)?, self.q_norm.as_ref(), rope, self.dims)?
        } else {
            let mut projected = self.qkv.forward(x)?;
            projected.norms = match (&self.q_norm, &self.k_norm) {
                (Some(q), Some(k)) => Some(HeadNorms { q, k }),
                _ => None,
            };
            if let Some(norm) = &self.v_norm {
                let d = self.dims;
                let heads = projected.v.reshape((projected.v.dim(0)?, d.num_kv_heads, d.head_dim))?;
                projected.v = norm.forward(&heads)?.flatten_from(1)?;
            }
            attention::store_kv(&projected, rope, kv, meta)?
        };
        let o = attention::attend(&q, kv, meta, &self.opts)?;
        self.o_proj.forward(&o)
    }
}

/// A layer's feed-forward block.
#[derive(Debug)]
enum FeedForward {
    Dense(GatedMlp),
    Sparse(SparseMoe),
    DenseAndSparse(Box<DenseAndSparse>),
}

/// Gemma 4's feed-forward: the dense MLP and the experts side by side (`MoeLayout::BesideDense`).
#[derive(Debug)]
struct DenseAndSparse {
    mlp: GatedMlp,
    mlp_out_norm: RmsNorm,
    experts_in_norm: RmsNorm,
    experts: SparseMoe,
    experts_out_norm: RmsNorm,
}

impl FeedForward {
    fn load(vb: WeightSource, spec: &DecoderSpec, layer: usize) -> Result<Self> {
        let mut mlp = spec.mlp;
        if spec.double_wide_shared_mlp && spec.kv_source_of(layer).is_some() {
            mlp.intermediate *= 2;
        }
        let norm = |name: &str| vb.pp(name).rms_norm(spec.hidden, spec.rms_eps, spec.norm_unit_offset);
        match &spec.moe {
            Some(moe) if moe.sparse_layers[layer] => match moe.layout {
                MoeLayout::Replacing { block } => Ok(Self::Sparse(load_moe(&vb, moe, block)?)),
                MoeLayout::Interleaved => Ok(Self::Sparse(load_interleaved_moe(&vb, moe)?)),
                MoeLayout::BesideDense => Ok(Self::DenseAndSparse(Box::new(DenseAndSparse {
                    mlp: load_mlp(vb.pp("mlp"), mlp)?,
                    mlp_out_norm: norm("post_feedforward_layernorm_1")?,
                    experts_in_norm: norm("pre_feedforward_layernorm_2")?,
                    experts: load_moe_beside_dense(&vb, moe, spec.rms_eps)?,
                    experts_out_norm: norm("post_feedforward_layernorm_2")?,
                }))),
            },
            _ => Ok(Self::Dense(load_mlp(vb.pp("mlp"), mlp)?)),
        }
    }

    /// The block's output for `normed`, the layer's norm of its `residual` (Gemma 4's experts
    /// read the residual through norms of their own).
    fn forward(&self, residual: &Tensor, normed: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(normed),
            Self::Sparse(moe) => moe.forward(normed, normed),
            Self::DenseAndSparse(block) => {
                let dense = block.mlp_out_norm.forward(&block.mlp.forward(normed)?)?;
                let experts_in = block.experts_in_norm.forward(residual)?;
                let sparse = block.experts.forward(residual, &experts_in)?;
                dense + block.experts_out_norm.forward(&sparse)?
            }
        }
    }
}

/// Gemma 4's per-layer input: `norm(projection(act(gate(x)) · input))`, added to the layer's
/// output.
#[derive(Debug)]
struct PerLayerInputGate {
    gate: Linear,
    projection: Linear,
    norm: RmsNorm,
    activation: Activation,
}

impl PerLayerInputGate {
    fn load(vb: &WeightSource, spec: &DecoderSpec, width: usize) -> Result<Self> {
        Ok(Self {
            gate: vb.pp("per_layer_input_gate").linear(spec.hidden, width, false)?,
            projection: vb.pp("per_layer_projection").linear(width, spec.hidden, false)?,
            norm: vb
                .pp("post_per_layer_input_norm")
                .rms_norm(spec.hidden, spec.rms_eps, spec.norm_unit_offset)?,
            activation: spec.mlp.activation,
        })
    }

    fn forward(&self, x: &Tensor, input: &Tensor) -> Result<Tensor> {
        let gated = self.activation.gated(&self.gate.forward(x)?, &input.contiguous()?)?;
        self.norm.forward(&self.projection.forward(&gated)?)
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
    per_layer_input: Option<PerLayerInputGate>,
    scalar: Option<f64>,
    cache_layer: usize,
}

impl DecoderLayer {
    fn load(vb: WeightSource, spec: &DecoderSpec, index: usize, layer: LayerType, cache_layer: usize) -> Result<Self> {
        let norm = |name: &str| vb.pp(name).rms_norm(spec.hidden, spec.rms_eps, spec.norm_unit_offset);
        let sandwich = spec.norm_placement == NormPlacement::Sandwich;
        let scalar = if spec.layer_scalar {
            Some(f64::from(
                vb.get(1, "layer_scalar")?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0],
            ))
        } else {
            None
        };
        Ok(Self {
            per_layer_input: spec
                .per_layer_input
                .map(|p| PerLayerInputGate::load(&vb, spec, p.width))
                .transpose()?,
            scalar,
            cache_layer,
            attn_norm: norm("input_layernorm")?,
            attn: Attention::load(vb.pp("self_attn"), spec, index, layer)?,
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
    /// Gemma 4's layers end with their per-layer input (`per_layer_input`, `[T, width]`) and
    /// scalar, and leave nothing pending.
    fn forward(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        per_layer_input: Option<&Tensor>,
        rope: &RotaryAtPositions,
        kv: &mut LayerKv,
        meta: &AttentionMeta,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (x, normed) = self.attn_norm.add_forward(x, delta)?;
        let mut h = self.attn.forward(&normed, rope, kv, meta)?;
        if let Some(n) = &self.attn_out_norm {
            h = n.forward(&h)?;
        }
        let (x, normed) = self.mlp_norm.add_forward(&x, Some(&h))?;
        let mut h = self.mlp.forward(&x, &normed)?;
        if let Some(n) = &self.mlp_out_norm {
            h = n.forward(&h)?;
        }
        if self.per_layer_input.is_none() && self.scalar.is_none() {
            return Ok((x, Some(h)));
        }
        let mut x = (x + h)?;
        if let Some(gate) = &self.per_layer_input {
            let input = per_layer_input.ok_or_else(|| candle_core::Error::Msg("no per-layer input".into()))?;
            x = (&x + gate.forward(&x, input)?)?;
        }
        if let Some(scalar) = self.scalar {
            x = (x * scalar)?;
        }
        Ok((x, None))
    }
}

/// Gemma 4's per-layer input embeddings: the table, the projection of the embeddings and its
/// norm (`PerLayerInputSpec`).
#[derive(Debug)]
struct PerLayerInputs {
    table: Embed,
    projection: Linear,
    norm: RmsNorm,
    width: usize,
    num_layers: usize,
    hidden: usize,
}

impl PerLayerInputs {
    fn load(m: &WeightSource, spec: &DecoderSpec, p: PerLayerInputSpec) -> Result<Self> {
        let packed = spec.num_layers * p.width;
        Ok(Self {
            table: m.pp("embed_tokens_per_layer").embed(p.vocab, packed)?,
            projection: m.pp("per_layer_model_projection").linear(spec.hidden, packed, false)?,
            norm: m
                .pp("per_layer_projection_norm")
                .rms_norm(p.width, spec.rms_eps, spec.norm_unit_offset)?,
            width: p.width,
            num_layers: spec.num_layers,
            hidden: spec.hidden,
        })
    }

    /// Every layer's input `[T, layers, width]`: `(norm(projection(embedded) · hidden^-0.5) +
    /// table[ids] · √width) · 2^-0.5`, as transformers' `get_per_layer_inputs` and
    /// `project_per_layer_inputs`.
    fn forward(&self, ids: &Tensor, embedded: &Tensor) -> Result<Tensor> {
        let shape = (ids.dim(0)?, self.num_layers, self.width);
        let tokens = (self.table.forward(ids)? * (self.width as f64).sqrt())?.reshape(shape)?;
        let projected = (self.projection.forward(embedded)? * (self.hidden as f64).powf(-0.5))?.reshape(shape)?;
        let projected = self.norm.forward(&projected)?;
        (projected + tokens.to_dtype(embedded.dtype())?)? * std::f64::consts::FRAC_1_SQRT_2
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
    per_layer_inputs: Option<PerLayerInputs>,
    vision: Option<VisionEncoder>,
    /// How attention reduces (the layers' own layouts were chosen at load).
    numerics: Numerics,
    config: ModelConfig,
}

impl Decoder {
    /// Builds the model from a family's spec and weights under `vb` (HF tensor names).
    /// `config.kv_widths` is set from the spec: the width of every layer that keeps KV.
    pub fn load(
        vb: WeightSource,
        spec: &DecoderSpec,
        mut config: ModelConfig,
        progress: &LoadProgress,
    ) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let numerics = vb.numerics();
        let m = vb.pp(&spec.prefix);
        let embed_tokens = m.pp("embed_tokens").embed(spec.vocab, spec.hidden)?;
        let (cache_layers, kv_widths) = spec.kv_plan()?;
        config.kv_widths = kv_widths;
        progress.set_length(spec.num_layers as u64);
        let layers = spec
            .layer_types
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let layer = DecoderLayer::load(m.pp(format!("layers.{i}")), spec, i, kind, cache_layers[i]);
                progress.inc();
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if spec.tie_embeddings || !vb.contains_tensor("lm_head.weight") {
            embed_tokens.as_linear(numerics)
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
            per_layer_inputs: spec
                .per_layer_input
                .map(|p| PerLayerInputs::load(&m, spec, p))
                .transpose()?,
            vision: None,
            numerics,
            config,
        })
    }

    /// The same model taking images through `vision` (a vision-language checkpoint).
    pub fn with_vision(mut self, vision: Option<VisionEncoder>) -> Self {
        self.vision = vision;
        self
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

    fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        match &self.vision {
            Some(vision) => vision.encode(&pixels.to_dtype(self.config.dtype)?),
            None => candle_core::bail!("this model has no vision input"),
        }
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

    /// Embeds every scheduled token (and Gemma 4's per-layer inputs); builds the per-forward
    /// rope rows and attention metadata (one per head layout); runs the decoder layers, each on
    /// its KV cache layer.
    fn layers_forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> Result<Residual> {
        let mut x = self.embed_tokens.forward(&batch.token_ids)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        if let Some(images) = &batch.images {
            // Soft tokens take their image's embeddings as they are (not scaled).
            let embeds = images.embeds.to_dtype(x.dtype())?;
            let delta = (embeds - x.index_select(&images.rows, 0)?)?;
            x = x.index_add(&images.rows, &delta, 0)?;
        }
        let per_layer_inputs = self
            .per_layer_inputs
            .as_ref()
            .map(|p| p.forward(&batch.token_ids, &x))
            .transpose()?;
        let dtype = x.dtype();
        let rope_full = self.rope_full.at(&batch.positions)?;
        let rope_sliding = self.rope_sliding.as_ref().map(|r| r.at(&batch.positions)).transpose()?;
        let mut metas: Vec<(HeadDims, AttentionMeta)> = Vec::new();
        for layer in &self.layers {
            if !metas.iter().any(|(d, _)| *d == layer.attn.dims) {
                let meta = AttentionMeta::new(batch, layer.attn.dims, &self.windows, dtype, self.numerics)?;
                metas.push((layer.attn.dims, meta));
            }
        }
        let mut delta = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let rope = match &rope_sliding {
                Some(sliding) if layer.attn.sliding => sliding,
                _ => &rope_full,
            };
            let meta = &metas
                .iter()
                .find(|(d, _)| *d == layer.attn.dims)
                .expect("invariant: a plan per head layout")
                .1;
            let input = per_layer_inputs
                .as_ref()
                .map(|p| p.narrow(1, i, 1)?.squeeze(1))
                .transpose()?;
            let layer_kv = &mut kv.layers_mut()[layer.cache_layer];
            (x, delta) = layer.forward(&x, delta.as_ref(), input.as_ref(), rope, layer_kv, meta)?;
        }
        Ok(Residual { x, delta })
    }
}
