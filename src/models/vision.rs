//! Vision input: the tower that turns images into soft-token embeddings for the decoder, and
//! the facts of its processor. Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP encoder
//! (patch embedding, pre-norm transformer layers with full attention, post-LayerNorm) and the
//! multimodal projector (average pooling to the soft-token grid, the soft-embedding RMSNorm
//! with `1 + w`, the input projection), as transformers 5.25's `modeling_gemma3.py` and
//! `modeling_siglip.py` compute them.

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::LayerNorm;
use serde_json::Value;

use crate::compute::layers::{Linear, RmsNorm};
use crate::formats::source::WeightSource;
use crate::formats::LoadError;

/// What a vision model's processor does with an image, from config.json and the folder's
/// processor configuration: what the request layer needs to prepare images and place their
/// soft tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionFacts {
    /// Side of the square the tower takes.
    pub image_size: u32,
    /// Per-channel mean of the normalization.
    pub mean: [f32; 3],
    /// Per-channel deviation of the normalization.
    pub std: [f32; 3],
    /// Factor from 0..=255 to the model's range.
    pub rescale: f32,
    /// Soft tokens per image.
    pub tokens_per_image: usize,
    /// The soft token's id.
    pub image_token_id: u32,
    /// The token that opens an image (the chat template writes it where an image stands).
    pub begin_token_id: u32,
    /// The token that closes an image.
    pub end_token_id: u32,
    /// Text the processor puts on each side of an image's tokens (Gemma 3: a blank line).
    pub padding: &'static str,
}

/// Where the tower and projector live in the checkpoints that exist in the wild (the Hub's
/// Gemma 3 files and transformers 5's own saves).
const TOWER_PREFIXES: [&str; 4] = [
    "vision_tower.vision_model",
    "model.vision_tower.vision_model",
    "vision_tower",
    "model.vision_tower",
];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];

/// Images to soft-token embeddings: the tower and the projector.
#[derive(Debug)]
pub struct VisionEncoder {
    tower: SiglipTower,
    projector: Gemma3Projector,
}

/// Where a Gemma 3 tower comes from: its weights (under Hugging Face names), its
/// `vision_config` and `mm_tokens_per_image` as config.json spells them, the processor's
/// normalization, and the ids of its tokens.
pub struct Gemma3Vision<'a> {
    /// The weights: a folder's, or an mmproj file's through its names.
    pub weights: &'a WeightSource,
    /// `{"vision_config": {…}, "mm_tokens_per_image": …}`.
    pub config: &'a Value,
    /// Mean, deviation and rescale factor of the pixels.
    pub normalization: ([f32; 3], [f32; 3], f32),
    /// The soft token's id, and the ids that open and close an image.
    pub tokens: [u32; 3],
    /// The soft-embedding norm's weight is stored as `w` (transformers) rather than `1 + w`
    /// (llama.cpp's mmproj files).
    pub norm_unit_offset: bool,
}

impl<'a> Gemma3Vision<'a> {
    /// The tower of a Hugging Face folder `dir` (its config.json `raw`, its processor's files).
    pub fn from_folder(weights: &'a WeightSource, raw: &'a Value, dir: &Path) -> std::result::Result<Self, LoadError> {
        let id = |key: &str, default: u64| raw[key].as_u64().unwrap_or(default) as u32;
        Ok(Self {
            weights,
            config: raw,
            normalization: processor_normalization(dir)?,
            tokens: [
                id("image_token_index", 262_144),
                id("boi_token_index", 255_999),
                id("eoi_token_index", 256_000),
            ],
            norm_unit_offset: true,
        })
    }
}

impl VisionEncoder {
    /// The Gemma 3 tower and projector of `source` for a decoder `text_hidden` wide, and its
    /// processor's facts; None when the weights hold no tower (a text-only Gemma 3).
    pub fn load_gemma3(
        source: &Gemma3Vision,
        text_hidden: usize,
    ) -> std::result::Result<Option<(Self, VisionFacts)>, LoadError> {
        let vb = source.weights;
        let Some(tower_prefix) = TOWER_PREFIXES
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}.embeddings.patch_embedding.weight")))
        else {
            return Ok(None);
        };
        let projector_prefix = PROJECTOR_PREFIXES
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}.mm_input_projection_weight")))
            .ok_or_else(|| malformed("a vision tower but no multi_modal_projector"))?;
        let raw = source.config;
        let v = &raw["vision_config"];
        let dim = |key: &str, default: usize| v[key].as_u64().map_or(default, |n| n as usize);
        let shape = TowerShape {
            hidden: dim("hidden_size", 1152),
            intermediate: dim("intermediate_size", 4304),
            layers: dim("num_hidden_layers", 27),
            heads: dim("num_attention_heads", 16),
            image_size: dim("image_size", 896),
            patch_size: dim("patch_size", 14),
            eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-6),
        };
        let tokens_per_image = raw["mm_tokens_per_image"].as_u64().unwrap_or(256) as usize;
        if [
            shape.hidden,
            shape.heads,
            shape.layers,
            shape.image_size,
            shape.patch_size,
        ]
        .contains(&0)
            || !shape.hidden.is_multiple_of(shape.heads)
        {
            return Err(malformed(&format!("vision_config: a zero or uneven size in {shape:?}")));
        }
        let side = shape.image_size / shape.patch_size;
        let per_side = (tokens_per_image as f64).sqrt() as usize;
        if !shape.image_size.is_multiple_of(shape.patch_size)
            || per_side * per_side != tokens_per_image
            || per_side == 0
            || !side.is_multiple_of(per_side)
        {
            return Err(malformed(&format!(
                "vision_config: image {} with patches of {} cannot pool to {tokens_per_image} tokens",
                shape.image_size, shape.patch_size
            )));
        }
        let load = || -> Result<Self> {
            let projector_vb = vb.pp(projector_prefix);
            let projection = projector_vb.get((shape.hidden, text_hidden), "mm_input_projection_weight")?;
            Ok(Self {
                tower: SiglipTower::load(&vb.pp(tower_prefix), shape)?,
                projector: Gemma3Projector {
                    pool: side / per_side,
                    side,
                    norm: projector_vb.pp("mm_soft_emb_norm").rms_norm(
                        shape.hidden,
                        shape.eps,
                        source.norm_unit_offset,
                    )?,
                    projection: vb.dense_linear(projection.t()?.contiguous()?, None)?,
                },
            })
        };
        let encoder = load().map_err(|e| malformed(&e.to_string()))?;
        let (mean, std, rescale) = source.normalization;
        let [image_token_id, begin_token_id, end_token_id] = source.tokens;
        let facts = VisionFacts {
            image_size: shape.image_size as u32,
            mean,
            std,
            rescale,
            tokens_per_image,
            image_token_id,
            begin_token_id,
            end_token_id,
            padding: "\n\n",
        };
        Ok(Some((encoder, facts)))
    }

    /// `[N, 3, size, size]` normalized pixels → `[N, tokens_per_image, hidden]` soft-token
    /// embeddings, in the pixels' dtype. The images go through the tower in passes whose
    /// attention scores stay within SCORES_BYTES (one 896² image of Gemma 3 a pass).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        self.encode_in_passes(pixels, self.tower.images_per_pass())
    }

    /// `encode`, `per_pass` images at a time.
    fn encode_in_passes(&self, pixels: &Tensor, per_pass: usize) -> Result<Tensor> {
        let n = pixels.dim(0)?;
        let parts = (0..n)
            .step_by(per_pass)
            .map(|i| {
                let features = self.tower.forward(&pixels.narrow(0, i, per_pass.min(n - i))?)?;
                self.projector.forward(&features)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

fn malformed(reason: &str) -> LoadError {
    LoadError::Malformed {
        file: "vision tower".into(),
        reason: reason.into(),
    }
}

/// The normalization of the folder's image processor (`preprocessor_config.json`, or
/// transformers 5's `processor_config.json`), with SigLIP's defaults where it says nothing.
fn processor_normalization(dir: &Path) -> std::result::Result<([f32; 3], [f32; 3], f32), LoadError> {
    let read = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let config = read("preprocessor_config.json")
        .or_else(|| read("processor_config.json").map(|p| p["image_processor"].clone()))
        .unwrap_or(Value::Null);
    normalization(&config)
}

/// `image_mean`, `image_std` and `rescale_factor` of a processor configuration (SigLIP's 0.5,
/// 0.5 and 1/255 where absent).
pub fn normalization(config: &Value) -> std::result::Result<([f32; 3], [f32; 3], f32), LoadError> {
    let triple = |key: &str| -> std::result::Result<[f32; 3], LoadError> {
        match &config[key] {
            Value::Null => Ok([0.5; 3]),
            Value::Array(v) if v.len() == 3 && v.iter().all(Value::is_number) => {
                Ok([0, 1, 2].map(|i| v[i].as_f64().unwrap_or(0.5) as f32))
            }
            other => Err(malformed(&format!("processor `{key}` is not three numbers: {other}"))),
        }
    };
    let std = triple("image_std")?;
    if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        return Err(malformed("processor `image_std` holds a zero"));
    }
    let rescale = config["rescale_factor"].as_f64().unwrap_or(1.0 / 255.0) as f32;
    Ok((triple("image_mean")?, std, rescale))
}

/// The sizes of a SigLIP tower.
#[derive(Clone, Copy, Debug)]
struct TowerShape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    image_size: usize,
    patch_size: usize,
    eps: f64,
}

/// SigLIP's vision transformer without its pooling head.
#[derive(Debug)]
struct SiglipTower {
    /// The patch convolution as a matrix over flattened `[3, p, p]` patches.
    patch: Linear,
    /// `[patches, hidden]` learned positions.
    positions: Tensor,
    layers: Vec<SiglipLayer>,
    post_norm: LayerNorm,
    shape: TowerShape,
}

#[derive(Debug)]
struct SiglipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

fn layer_norm(vb: &WeightSource, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
}

/// Most bytes of f32 attention scores one tower pass may hold (`[images · heads, patches,
/// patches]`): bounds the memory a step with many images takes.
const SCORES_BYTES: usize = 1 << 30;

impl SiglipTower {
    /// Images one pass takes within SCORES_BYTES (at least one).
    fn images_per_pass(&self) -> usize {
        let patches = (self.shape.image_size / self.shape.patch_size).pow(2);
        (SCORES_BYTES / (self.shape.heads * patches * patches * 4)).max(1)
    }

    fn load(vb: &WeightSource, shape: TowerShape) -> Result<Self> {
        let TowerShape {
            hidden,
            intermediate,
            patch_size: p,
            eps,
            ..
        } = shape;
        let embeddings = vb.pp("embeddings");
        let conv = embeddings.get((hidden, 3, p, p), "patch_embedding.weight")?;
        let patch = vb.dense_linear(
            conv.reshape((hidden, 3 * p * p))?,
            Some(embeddings.get(hidden, "patch_embedding.bias")?),
        )?;
        let patches = (shape.image_size / p).pow(2);
        let positions = embeddings.get((patches, hidden), "position_embedding.weight")?;
        let layers = (0..shape.layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layers.{i}"));
                let attn = l.pp("self_attn");
                Ok(SiglipLayer {
                    norm1: layer_norm(&l.pp("layer_norm1"), hidden, eps)?,
                    q: attn.pp("q_proj").linear(hidden, hidden, true)?,
                    k: attn.pp("k_proj").linear(hidden, hidden, true)?,
                    v: attn.pp("v_proj").linear(hidden, hidden, true)?,
                    out: attn.pp("out_proj").linear(hidden, hidden, true)?,
                    norm2: layer_norm(&l.pp("layer_norm2"), hidden, eps)?,
                    fc1: l.pp("mlp.fc1").linear(hidden, intermediate, true)?,
                    fc2: l.pp("mlp.fc2").linear(intermediate, hidden, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch,
            positions,
            layers,
            post_norm: layer_norm(&vb.pp("post_layernorm"), hidden, eps)?,
            shape,
        })
    }

    /// `[N, 3, S, S]` → `[N, patches, hidden]` (post-normed last hidden state).
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let TowerShape {
            hidden,
            heads,
            image_size,
            patch_size: p,
            ..
        } = self.shape;
        let n = pixels.dim(0)?;
        let side = image_size / p;
        let patches = side * side;
        // Patch (row, col) flattened as the convolution's weight is: channel, then y, then x.
        let flat = pixels
            .reshape((n, 3, side, p, side, p))?
            .permute([0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((n * patches, 3 * p * p))?;
        let embedded = self.patch.forward(&flat)?.reshape((n, patches, hidden))?;
        let mut x = embedded
            .broadcast_add(&self.positions)?
            .reshape((n * patches, hidden))?;
        let head_dim = hidden / heads;
        let scale = (head_dim as f64).powf(-0.5);
        for layer in &self.layers {
            let normed = layer.norm1.forward(&x)?;
            let split = |t: Tensor| -> Result<Tensor> {
                t.reshape((n, patches, heads, head_dim))?.transpose(1, 2)?.contiguous()
            };
            let q = split(layer.q.forward(&normed)?)?;
            let k = split(layer.k.forward(&normed)?)?;
            let v = split(layer.v.forward(&normed)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let attended = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n * patches, hidden))?;
            x = (x + layer.out.forward(&attended)?)?;
            let normed = layer.norm2.forward(&x)?;
            let mlp = layer.fc2.forward(&layer.fc1.forward(&normed)?.gelu()?)?;
            x = (x + mlp)?;
        }
        self.post_norm.forward(&x)?.reshape((n, patches, hidden))
    }
}

/// Gemma 3's multimodal projector: the patch grid average-pooled to the soft-token grid, the
/// soft-embedding norm, then `x · W` into the decoder's width.
#[derive(Debug)]
struct Gemma3Projector {
    /// Patches per side of one pooling window.
    pool: usize,
    /// Patches per side of the image.
    side: usize,
    norm: RmsNorm,
    projection: Linear,
}

impl Gemma3Projector {
    /// `[N, patches, vision hidden]` → `[N, tokens, hidden]`.
    fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (n, _, width) = features.dims3()?;
        let grid = features
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, width, self.side, self.side))?;
        let pooled = grid
            .avg_pool2d(self.pool)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let tokens = pooled.dim(1)?;
        let normed = self.norm.forward(&pooled.reshape((n * tokens, width))?)?;
        let projected = self.projection.forward(&normed)?;
        projected.reshape((n, tokens, projected.dim(D::Minus1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Numerics;
    use candle_core::{DType, Device};

    /// The Gemma 3 vision fixture's encoder (tests/data/gemma3_vision).
    fn fixture_encoder() -> VisionEncoder {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3_vision/f32");
        let raw: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
        let files = crate::formats::weights::WeightFiles::open(&dir, None).expect("weights");
        let vb = WeightSource::hf(
            files.var_builder(DType::F32, &Device::Cpu).expect("mmap"),
            Numerics::Fastest,
        );
        let source = Gemma3Vision::from_folder(&vb, &raw, &dir).expect("source");
        VisionEncoder::load_gemma3(&source, 64)
            .expect("loads")
            .expect("a tower")
            .0
    }

    #[test]
    fn images_encoded_in_passes_equal_one_pass() -> Result<()> {
        let encoder = fixture_encoder();
        let pixels = Tensor::randn(0f32, 1.0, (3, 3, 64, 64), &Device::Cpu)?;
        let whole = encoder.encode_in_passes(&pixels, 3)?;
        let passes = encoder.encode_in_passes(&pixels, 2)?;
        assert_eq!(whole.dims(), &[3, 4, 64]);
        let diff = (whole - passes)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
