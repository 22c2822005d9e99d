//! Where a model's tensors come from: a Hugging Face safetensors folder or a GGUF file, both
//! addressed by Hugging Face tensor names so the one `Decoder` loads either.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::gguf::GgufStore;
use super::mxfp4::Mxfp4Matrix;

/// A tensor namespace (`model.layers.3.self_attn`) in one of the supported containers.
#[derive(Clone)]
pub enum WeightSource {
    /// Memory-mapped safetensors (dense or MLX-quantized).
    Hf(VarBuilder<'static>),
    /// A GGUF file; `path` is the Hugging Face-style prefix mapped to GGUF names on access.
    Gguf {
        /// The open file.
        store: Arc<GgufStore>,
        /// Prefix of this namespace.
        path: String,
    },
}

impl WeightSource {
    /// The namespace `name` inside this one.
    pub fn pp(&self, name: impl ToString) -> Self {
        match self {
            Self::Hf(vb) => Self::Hf(vb.pp(name)),
            Self::Gguf { store, path } => Self::Gguf {
                store: store.clone(),
                path: join(path, &name.to_string()),
            },
        }
    }

    /// A dense tensor in the compute dtype, checked against `shape`.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        match self {
            Self::Hf(vb) => vb.get(shape, name),
            Self::Gguf { store, path } => {
                let t = store.dense(&join(path, name))?;
                let shape = shape.into();
                if t.shape() != &shape {
                    candle_core::bail!(
                        "{}: expected shape {shape:?}, file has {:?}",
                        join(path, name),
                        t.shape()
                    );
                }
                Ok(t)
            }
        }
    }

    /// True when the namespace holds `name`.
    pub fn contains_tensor(&self, name: &str) -> bool {
        match self {
            Self::Hf(vb) => vb.contains_tensor(name),
            Self::Gguf { store, path } => store.contains(&join(path, name)),
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Hf(vb) => vb.dtype(),
            Self::Gguf { store, .. } => store.dtype(),
        }
    }

    /// The device tensors are loaded to.
    pub fn device(&self) -> &Device {
        match self {
            Self::Hf(vb) => vb.device(),
            Self::Gguf { store, .. } => store.device(),
        }
    }

    /// The safetensors view, for formats stored there (MLX packing).
    pub fn as_hf(&self) -> Option<&VarBuilder<'static>> {
        match self {
            Self::Hf(vb) => Some(vb),
            Self::Gguf { .. } => None,
        }
    }

    /// `name` as an MXFP4 matrix, when a GGUF file stores it so (Hugging Face folders keep
    /// MXFP4 as `_blocks`/`_scales` pairs: `mxfp4_stacked`).
    pub fn mxfp4(&self, name: &str) -> Option<Result<Mxfp4Matrix>> {
        match self {
            Self::Hf(_) => None,
            Self::Gguf { store, path } => store.mxfp4(&join(path, name)),
        }
    }

    /// `name` as a GGUF quantized tensor, when it is one (block-quantized, or F16 on the CPU;
    /// other float tensors load dense).
    pub fn quantized(&self, name: &str) -> Option<Result<QTensor>> {
        match self {
            Self::Hf(_) => None,
            Self::Gguf { store, path } => store.quantized(&join(path, name)),
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
