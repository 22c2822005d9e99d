//! Images in a prompt: what a vision model's processor does to one (`ImageProcessor`, facts of
//! the served model), decoding the client's bytes during validation (undecodable data and
//! decompression bombs are refused before anything reaches the engine), and where each image's
//! tokens sit in the prompt (`ImageSpan`), keyed by the image's content for the prefix cache.

use std::io::Cursor;
use std::sync::Arc;

use image::imageops::FilterType;
use image::{ImageReader, Limits};
use xxhash_rust::xxh3::xxh3_64;

/// Largest width or height of an image accepted: its pixels are decoded before the resize, so
/// this bounds the memory one image can take (a header may declare any size).
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Most bytes the decoder may allocate for one image.
const MAX_DECODED_BYTES: u64 = 256 << 20;

/// How a vision model takes images, as its Hugging Face processor does: the resize and
/// normalization of the pixels, and the text an image becomes in the prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Side of the square the tower takes (every image is stretched to it).
    pub size: u32,
    /// Per-channel mean subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel deviation divided by after the mean.
    pub std: [f32; 3],
    /// Factor from 0..=255 to the model's range (1/255).
    pub rescale: f32,
    /// Soft tokens one image becomes (each one row of the projector's output).
    pub tokens_per_image: usize,
    /// The id of a soft token in the prompt.
    pub image_token: u32,
    /// What the chat template writes where an image stands (Gemma 3: `<start_of_image>`).
    pub marker: String,
    /// What the processor puts in its place before tokenizing: the marker wrapped around
    /// `tokens_per_image` soft tokens.
    pub expansion: String,
    /// Most images one request may carry.
    pub max_images: usize,
}

/// Where one image's soft tokens sit in a prompt and what identifies its content: equal
/// digests mean equal bytes, so their KV may be shared (the prefix cache hashes image tokens
/// by it, since all soft tokens have the same id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    /// Index of its first soft token in the prompt.
    pub start: usize,
    /// Its soft tokens.
    pub len: usize,
    /// xxh3 of the image file's bytes.
    pub digest: u64,
}

impl ImageSpan {
    /// One past its last soft token.
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// An image of a validated prompt: where it sits, and its pixels as the tower takes them.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptImage {
    /// Its soft tokens in the prompt.
    pub span: ImageSpan,
    /// Its pixels, shared by the copies of an `n > 1` request.
    pub pixels: Arc<ImagePixels>,
}

/// Pixels resized and normalized for the vision tower: `[3, size, size]`, channel-major.
#[derive(Clone, PartialEq)]
pub struct ImagePixels {
    /// Side of the square.
    pub size: u32,
    /// The values, channel by channel, row by row.
    pub data: Vec<f32>,
}

impl std::fmt::Debug for ImagePixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImagePixels(3×{0}×{0})", self.size)
    }
}

impl ImageProcessor {
    /// Decodes `bytes` (PNG, JPEG, WebP or GIF; the first frame), drops any alpha, stretches it
    /// to the tower's square (bilinear, antialiased when shrinking, as PIL's resize) and
    /// normalizes it. The error says what is wrong with the bytes.
    pub fn prepare(&self, bytes: &[u8]) -> Result<ImagePixels, String> {
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot be read: {e}"))?;
        if reader.format().is_none() {
            return Err("is not a PNG, JPEG, WebP or GIF image".into());
        }
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        limits.max_alloc = Some(MAX_DECODED_BYTES);
        reader.limits(limits);
        let decoded = reader.decode().map_err(|e| match e {
            image::ImageError::Limits(_) => {
                format!("is too large (at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels)")
            }
            e => format!("cannot be decoded: {e}"),
        })?;
        if decoded.width() == 0 || decoded.height() == 0 {
            return Err("has no pixels".into());
        }
        let rgb = decoded.to_rgb8();
        let size = self.size;
        let rgb = if rgb.dimensions() == (size, size) {
            rgb
        } else {
            image::imageops::resize(&rgb, size, size, FilterType::Triangle)
        };
        let plane = (size * size) as usize;
        let mut data = vec![0f32; 3 * plane];
        for (i, pixel) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = (pixel[c] as f32 * self.rescale - self.mean[c]) / self.std[c];
            }
        }
        Ok(ImagePixels { size, data })
    }
}

/// The content key of an image file's bytes.
pub fn digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(size: u32) -> ImageProcessor {
        ImageProcessor {
            size,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale: 1.0 / 255.0,
            tokens_per_image: 4,
            image_token: 9,
            marker: "<img>".into(),
            expansion: "<img>".into(),
            max_images: 4,
        }
    }

    fn png(width: u32, height: u32, pixel: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb(pixel));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("encodes");
        out.into_inner()
    }

    #[test]
    fn pixels_are_rescaled_and_normalized_channel_by_channel() {
        let px = processor(2).prepare(&png(2, 2, [0, 255, 51])).expect("decodes");
        assert_eq!(px.size, 2);
        let expect = [-1.0f32, 1.0, 0.2 * 2.0 - 1.0];
        for (c, want) in expect.iter().enumerate() {
            for v in &px.data[c * 4..(c + 1) * 4] {
                assert!((v - want).abs() < 1e-6, "channel {c}: {v} vs {want}");
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_through_the_resize() {
        let px = processor(8).prepare(&png(30, 17, [255, 0, 255])).expect("decodes");
        assert_eq!(px.data.len(), 3 * 64);
        assert!(px.data[..64].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(px.data[64..128].iter().all(|&v| (v + 1.0).abs() < 1e-6));
    }

    #[test]
    fn bad_bytes_and_bombs_are_refused_with_a_reason() {
        let p = processor(4);
        assert!(p.prepare(b"not an image").unwrap_err().contains("not a PNG"));
        let mut cut = png(16, 16, [1, 2, 3]);
        cut.truncate(cut.len() / 2);
        assert!(p.prepare(&cut).unwrap_err().contains("cannot be decoded"));
        // Wider than any image accepted: refused from its header, before its pixels.
        let wide = png(MAX_IMAGE_SIDE + 1, 1, [0, 0, 0]);
        assert!(p.prepare(&wide).unwrap_err().contains("too large"));
    }
}
