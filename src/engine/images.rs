//! Images inside the engine's steps: which rows of a step are image soft tokens (`ImagePlan`),
//! and their embeddings from one call of the vision encoder over every image the step needs
//! (each distinct image once, however many sequences carry it).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use crate::compute::batch::ImageRows;
use crate::models::Model;
use crate::request::{ImagePixels, PromptImage, RequestId};
use crate::scheduler::SchedulerOutput;

/// A step's soft-token rows and the images they come from.
#[derive(Debug, Default)]
pub(crate) struct ImagePlan {
    /// Each distinct image of the step, in order of first use.
    images: Vec<Arc<ImagePixels>>,
    /// Batch rows that are soft tokens.
    rows: Vec<u32>,
    /// Per such row: image index · tokens per image + the token's place in its image.
    sources: Vec<u32>,
    /// Per batch row, the last position it attends to (see `ImageRows::last_visible`).
    last_visible: Vec<u32>,
}

impl ImagePlan {
    /// The soft tokens among the rows of `out` (whose positions are `positions`, in batch
    /// order); `images_of` gives a sequence's prompt images. None when the step feeds none.
    pub fn new<'a>(
        out: &SchedulerOutput,
        positions: &[u32],
        images_of: impl Fn(RequestId) -> Option<&'a [PromptImage]>,
    ) -> Option<Self> {
        let mut plan = Self::default();
        let mut index: HashMap<u64, u32> = HashMap::new();
        let mut row = 0usize;
        for s in &out.seqs {
            let fed = s.num_computed..s.num_computed + s.num_new;
            for image in images_of(s.id).unwrap_or_default() {
                let span = image.span;
                let (from, to) = (span.start.max(fed.start), span.end().min(fed.end));
                if from >= to {
                    continue;
                }
                let k = *index.entry(span.digest).or_insert_with(|| {
                    plan.images.push(image.pixels.clone());
                    (plan.images.len() - 1) as u32
                });
                for p in from..to {
                    let r = row + p - fed.start;
                    if plan.last_visible.is_empty() {
                        plan.last_visible = positions.to_vec();
                    }
                    plan.rows.push(r as u32);
                    plan.sources.push(k * span.len as u32 + (p - span.start) as u32);
                    plan.last_visible[r] = (span.end() - 1) as u32;
                }
            }
            row += s.num_new;
        }
        (!plan.rows.is_empty()).then_some(plan)
    }

    /// Encodes the step's images in one call (the tower takes them in as few passes as its
    /// memory bound allows) and picks each soft-token row's embedding.
    pub fn encode(self, model: &dyn Model, device: &Device) -> Result<ImageRows> {
        let size = self.images[0].size as usize;
        let mut pixels = Vec::with_capacity(self.images.len() * 3 * size * size);
        for image in &self.images {
            pixels.extend_from_slice(&image.data);
        }
        let pixels = Tensor::from_vec(pixels, (self.images.len(), 3, size, size), device)?;
        let encoded = model.encode_images(&pixels)?;
        let (n, tokens, hidden) = encoded.dims3()?;
        let sources = Tensor::from_vec(self.sources, self.rows.len(), device)?;
        let embeds = encoded.reshape((n * tokens, hidden))?.index_select(&sources, 0)?;
        let count = self.rows.len();
        Ok(ImageRows {
            rows: Tensor::from_vec(self.rows, count, device)?,
            embeds,
            last_visible: self.last_visible,
        })
    }
}
