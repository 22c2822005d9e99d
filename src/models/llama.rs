//! Llama-architecture decoder (Llama 2/3.x, TinyLlama, Mistral), stateless: KV lives in the
//! `PagedKvCache`, positions come from the `BatchInput`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::attention::{paged_attention, AttentionMeta, HeadDims};
use super::batch::BatchInput;
use super::config::HfConfig;
use super::layers::{GatedMlp, Linear, RmsNorm, Rotary, RotaryAtPositions};
use super::paged_kv::{LayerKv, PagedKvCache};
use super::{LoadProgress, Model, ModelConfig};

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    dims: HeadDims,
    scale: f64,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &HfConfig) -> Result<Self> {
        let dims = HeadDims {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
        };
        let (h, q_out, kv_out) = (
            cfg.hidden_size,
            dims.num_heads * dims.head_dim,
            dims.num_kv_heads * dims.head_dim,
        );
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, q_out, bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, kv_out, bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, kv_out, bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), q_out, h, bias)?,
            dims,
            scale: 1.0 / (dims.head_dim as f64).sqrt(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryAtPositions,
        kv: &mut LayerKv,
        meta: &AttentionMeta,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let HeadDims {
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.dims;
        // 1) project, 2) rotate q and k, 3) paged attention, 4) output projection.
        let q = self.q_proj.forward(x)?.reshape((t, num_heads, head_dim))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((t, num_kv_heads, head_dim))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((t, num_kv_heads, head_dim))?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let o = paged_attention(&q, &k, &v, kv, meta, self.scale)?;
        self.o_proj.forward(&o)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &HfConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: GatedMlp::load(
                vb.pp("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryAtPositions,
        kv: &mut LayerKv,
        meta: &AttentionMeta,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, kv, meta)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + h
    }
}

/// A loaded Llama-family model.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    dims: HeadDims,
    config: ModelConfig,
}

impl Llama {
    /// Builds the model from `config.json` and weights under `vb` (HF tensor names).
    pub fn load(
        vb: VarBuilder,
        cfg: &HfConfig,
        config: ModelConfig,
        progress: &LoadProgress,
    ) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            candle_core::bail!(
                "hidden_act `{}` is not supported (supported: silu)",
                cfg.hidden_act
            );
        }
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let rope = cfg.rope().map_err(candle_core::Error::wrap)?;
        let m = vb.pp("model");
        let embed_weight = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), cfg.hidden_size);
        progress.set_length(cfg.num_hidden_layers as u64);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let layer = DecoderLayer::load(m.pp(format!("layers.{i}")), cfg);
                progress.inc();
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embed_weight)
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let rotary = Rotary::new(
            &rope,
            cfg.head_dim(),
            cfg.max_position_embeddings,
            dtype,
            &device,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            dims: HeadDims {
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_kv_heads(),
                head_dim: cfg.head_dim(),
            },
            config,
        })
    }

    fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }
}

impl Model for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> Result<Tensor> {
        // 1) embed every scheduled token, 2) per-forward rope rows and attention metadata,
        // 3) decoder layers, 4) final norm and lm_head on the sampling rows only.
        let mut x = self.embed_tokens.forward(&batch.token_ids)?;
        let rope = self.rotary.at(&batch.positions)?;
        let meta = AttentionMeta::new(batch, self.dims, self.dtype(), self.device())?;
        for (layer, layer_kv) in self.layers.iter().zip(kv.layers_mut()) {
            x = layer.forward(&x, &rope, layer_kv, &meta)?;
        }
        let x = x.index_select(&batch.logits_rows, 0)?;
        let x = self.norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}
