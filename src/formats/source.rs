//! Where a model's tensors come from: a Hugging Face safetensors folder or a GGUF file, both
//! addressed by Hugging Face tensor names so the one `Decoder` loads either.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::gguf::GgufStore;
use super::mxfp4::Mxfp4Matrix;
use crate::compute::Numerics;

/// A tensor namespace (`model.layers.3.self_attn`) in one of the supported containers, and
/// the numerics the layers built from it compute with (which decides some CPU layouts).
#[derive(Clone)]
pub struct WeightSource {
    tensors: Tensors,
    numerics: Numerics,
}

/// The container of a `WeightSource`.
#[derive(Clone)]
enum Tensors {
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
    /// The root namespace of a safetensors folder.
    pub fn hf(vb: VarBuilder<'static>, numerics: Numerics) -> Self {
        Self {
            tensors: Tensors::Hf(vb),
            numerics,
        }
    }

    /// The root namespace of a GGUF file.
    pub fn gguf(store: Arc<GgufStore>, numerics: Numerics) -> Self {
        Self {
            tensors: Tensors::Gguf {
                store,
                path: String::new(),
            },
            numerics,
        }
    }

    /// How the layers built from these weights reduce.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// The namespace `name` inside this one.
    pub fn pp(&self, name: impl ToString) -> Self {
        let tensors = match &self.tensors {
            Tensors::Hf(vb) => Tensors::Hf(vb.pp(name)),
            Tensors::Gguf { store, path } => Tensors::Gguf {
                store: store.clone(),
                path: join(path, &name.to_string()),
            },
        };
        Self {
            tensors,
            numerics: self.numerics,
        }
    }

    /// A dense tensor in the compute dtype, checked against `shape`.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        match &self.tensors {
            Tensors::Hf(vb) => vb.get(shape, name),
            Tensors::Gguf { store, path } => {
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
        match &self.tensors {
            Tensors::Hf(vb) => vb.contains_tensor(name),
            Tensors::Gguf { store, path } => store.contains(&join(path, name)),
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match &self.tensors {
            Tensors::Hf(vb) => vb.dtype(),
            Tensors::Gguf { store, .. } => store.dtype(),
        }
    }

    /// The device tensors are loaded to.
    pub fn device(&self) -> &Device {
        match &self.tensors {
            Tensors::Hf(vb) => vb.device(),
            Tensors::Gguf { store, .. } => store.device(),
        }
    }

    /// The safetensors view, for formats stored there (MLX packing).
    pub fn as_hf(&self) -> Option<&VarBuilder<'static>> {
        match &self.tensors {
            Tensors::Hf(vb) => Some(vb),
            Tensors::Gguf { .. } => None,
        }
    }

    /// `name` as an MXFP4 matrix, when a GGUF file stores it so (Hugging Face folders keep
    /// MXFP4 as `_blocks`/`_scales` pairs: `mxfp4_stacked`).
    pub fn mxfp4(&self, name: &str) -> Option<Result<Mxfp4Matrix>> {
        match &self.tensors {
            Tensors::Hf(_) => None,
            Tensors::Gguf { store, path } => store.mxfp4(&join(path, name)),
        }
    }

    /// `name` as a GGUF quantized tensor, when it is one (block-quantized, or F16 on the CPU;
    /// other float tensors load dense).
    pub fn quantized(&self, name: &str) -> Option<Result<QTensor>> {
        match &self.tensors {
            Tensors::Hf(_) => None,
            Tensors::Gguf { store, path } => store.quantized(&join(path, name)),
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
