//! Building blocks shared by every model family: linear layers, RMSNorm, rotary embeddings,
//! the gated MLP.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::RopeConfig;

/// A linear layer `y = x Wᵀ + b`. An enum so quantized weight formats slot in beside the dense
/// one without changing model code.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weights in the compute dtype.
    Dense(candle_nn::Linear),
}

impl Linear {
    /// Loads `<prefix>.weight` (`[out, in]`) and, if `bias`, `<prefix>.bias`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// A dense layer over an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }

    /// Applies the layer to `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
        }
    }
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `<prefix>.weight` of size `dim`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }

    /// Normalizes over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Precomputed rotary cos/sin tables for every position up to the model's context.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

/// Cos/sin rows gathered for one batch's positions, applied to q and k of every layer.
#[derive(Debug, Clone)]
pub struct RotaryAtPositions {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Tables `[max_positions, head_dim / 2]` from the model's rope configuration.
    pub fn new(
        rope: &RopeConfig,
        head_dim: usize,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = rope.inv_freq(head_dim);
        let half = inv_freq.len();
        // f32 like transformers: angle = position * inv_freq, rounded once.
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Gathers the rows for `positions` (`[T]` u32).
    pub fn at(&self, positions: &Tensor) -> Result<RotaryAtPositions> {
        Ok(RotaryAtPositions {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
        })
    }
}

impl RotaryAtPositions {
    /// Rotates `[T, heads, head_dim]` (half-split "neox" layout, as transformers' Llama).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &self.cos, &self.sin)?
            .squeeze(0)
    }
}

/// Gated MLP `down(act(gate(x)) * up(x))` with SiLU.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl GatedMlp {
    /// Loads `gate_proj`, `up_proj`, `down_proj` under `vb`.
    pub fn load(vb: VarBuilder, hidden: usize, intermediate: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(vb.pp("gate_proj"), hidden, intermediate, bias)?,
            up: Linear::load(vb.pp("up_proj"), hidden, intermediate, bias)?,
            down: Linear::load(vb.pp("down_proj"), intermediate, hidden, bias)?,
        })
    }

    /// Applies the MLP to `[T, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}
