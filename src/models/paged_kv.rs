//! The KV memory: per layer, one K and one V tensor of `num_blocks * block_size` slots.
//!
//! Owner: the engine thread. Sized once at start from the byte budget and never grown. Slot
//! `block * block_size + offset` holds one token's keys (all KV heads, `kv_width` values).

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Attention layers that keep KV.
    pub num_layers: usize,
    /// KV heads times head dimension: values per token per layer for K (and for V).
    pub kv_width: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Element type of the cache.
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes one block takes over all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.kv_width * self.dtype.size_in_bytes()
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
        let layers = (0..layout.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: Tensor::zeros((num_slots, layout.kv_width), layout.dtype, device)?,
                    v: Tensor::zeros((num_slots, layout.kv_width), layout.dtype, device)?,
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
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Blocks in the cache (including the null block).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Mutable access to every layer's storage, in layer order.
    pub fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }
}
