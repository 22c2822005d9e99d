//! The KV memory: per layer that keeps KV, one K and one V tensor of `num_blocks * block_size`
//! slots. Layers that read another layer's KV (Gemma 4's shared-KV layers) have none: a block
//! holds one slot range in every KV-keeping layer, so sharing needs nothing of the block
//! manager but the byte count of a block, which counts only the layers that keep KV.
//!
//! Owner: the engine thread. Sized once at start from the byte budget and never grown. Slot
//! `block * block_size + offset` holds one token's keys (all KV heads of the layer, its
//! `width` values).

use candle_core::{DType, Device, Result, Tensor};

/// K and V storage of one attention layer: `[num_slots, kv_heads * head_dim]` each.
#[derive(Debug)]
pub struct LayerKv {
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

/// Shape of the KV cache, independent of where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Per attention layer that keeps KV, in order: KV heads times head dimension, the values
    /// per token for K (and for V).
    pub widths: Vec<usize>,
    /// Tokens per block.
    pub block_size: usize,
    /// Element type of the cache.
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes one block takes over all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.block_size * self.widths.iter().sum::<usize>() * self.dtype.size_in_bytes()
    }
}

/// All layers' KV slots.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: KvLayout,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl PagedKvCache {
    /// Allocates zeroed KV storage for `num_blocks` blocks.
    pub fn new(layout: KvLayout, num_blocks: usize, device: &Device) -> Result<Self> {
        let num_slots = num_blocks * layout.block_size;
        let layers = layout
            .widths
            .iter()
            .map(|&width| {
                let shape = (num_slots, width);
                Ok(LayerKv {
                    k: zeroed(shape, layout.dtype, device)?,
                    v: zeroed(shape, layout.dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layout,
            num_blocks,
            layers,
        })
    }

    /// The cache's shape.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks in the cache (including the null block).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Mutable access to every KV-keeping layer's storage, in layer order.
    pub fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// One block's K and V over all layers as bytes (layer by layer, K then V, native
    /// endianness): what the disk cache stores.
    pub fn read_block(&self, block: usize) -> Result<Vec<u8>> {
        let bs = self.layout.block_size;
        let mut out = Vec::with_capacity(self.layout.bytes_per_block());
        for layer in &self.layers {
            for t in [&layer.k, &layer.v] {
                let rows = t.narrow(0, block * bs, bs)?.flatten_all()?;
                match self.layout.dtype {
                    DType::F32 => extend_bytes(&mut out, &rows.to_vec1::<f32>()?),
                    DType::F16 => extend_bytes(&mut out, &rows.to_vec1::<half::f16>()?),
                    DType::BF16 => extend_bytes(&mut out, &rows.to_vec1::<half::bf16>()?),
                    other => candle_core::bail!("KV blocks of {other:?} cannot be saved"),
                }
            }
        }
        Ok(out)
    }

    /// Writes bytes made by `read_block` (same layout) into `block`.
    pub fn write_block(&mut self, block: usize, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.layout.bytes_per_block() {
            candle_core::bail!(
                "a KV block of {} bytes does not fit this cache's {}-byte blocks",
                bytes.len(),
                self.layout.bytes_per_block()
            );
        }
        let (bs, dtype) = (self.layout.block_size, self.layout.dtype);
        let mut rest = bytes;
        for (layer, &width) in self.layers.iter_mut().zip(&self.layout.widths) {
            for t in [&mut layer.k, &mut layer.v] {
                let (chunk, tail) = rest.split_at(bs * width * dtype.size_in_bytes());
                rest = tail;
                let rows = Tensor::from_raw_buffer(chunk, dtype, &[bs, width], &Device::Cpu)?.to_device(t.device())?;
                t.slice_set(&rows, 0, block * bs)?;
            }
        }
        Ok(())
    }
}

/// A zero tensor whose memory stays untouched until used. On the CPU candle fills half-precision
/// zeros element by element, which makes the whole pool resident at start; zeroed `u16`s come
/// from the allocator's zeroed pages instead, and reinterpret as f16/bf16 zeros.
fn zeroed(shape: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    use half::vec::HalfBitsVecExt;
    if !device.is_cpu() {
        return Tensor::zeros(shape, dtype, device);
    }
    let bits = || vec![0u16; shape.0 * shape.1];
    match dtype {
        DType::F16 => Tensor::from_vec(bits().reinterpret_into::<half::f16>(), shape, device),
        DType::BF16 => Tensor::from_vec(bits().reinterpret_into::<half::bf16>(), shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}

fn extend_bytes<T: Copy>(out: &mut Vec<u8>, values: &[T]) {
    // SAFETY: plain numeric values (f32, f16, bf16) viewed as their bytes.
    let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_round_trips_through_bytes_and_new_blocks_are_zero() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Layers of different widths (Gemma 4's sliding and global layers).
            let layout = KvLayout {
                widths: vec![3, 5],
                block_size: 4,
                dtype,
            };
            let mut kv = PagedKvCache::new(layout.clone(), 3, &Device::Cpu).expect("kv");
            assert_eq!(kv.layers_mut()[0].k.dtype(), dtype);
            let bytes: Vec<u8> = (0..layout.bytes_per_block()).map(|i| (i % 251) as u8).collect();
            kv.write_block(2, &bytes).expect("write");
            assert_eq!(kv.read_block(2).expect("read"), bytes, "{dtype:?}");
            assert!(kv.read_block(1).expect("read").iter().all(|&b| b == 0), "{dtype:?}");
        }
    }
}
