//! Decode steps replayed from CUDA graphs (`cuda.rs`). A build without the `cuda` feature has
//! no graphs: `DecodeGraphs` cannot be built there, and every step runs eagerly.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::DecodeGraphs;

#[cfg(not(feature = "cuda"))]
pub use off::DecodeGraphs;

#[cfg(not(feature = "cuda"))]
mod off {
    use candle_core::{Device, Result, Tensor};

    use crate::compute::paged_kv::PagedKvCache;
    use crate::engine::batch::HostBatch;
    use crate::models::Model;

    /// Cannot exist without the `cuda` feature.
    pub enum DecodeGraphs {}

    impl DecodeGraphs {
        /// Always None: no CUDA in this build.
        pub fn new(_: &Device, _: usize) -> Option<Self> {
            None
        }

        /// Unreachable: no value of this type exists.
        pub fn settle_scratch(&self, _: &dyn Model, _: &mut PagedKvCache, _: usize, _: usize) -> Result<()> {
            match *self {}
        }

        /// Unreachable: no value of this type exists.
        pub fn forward(&mut self, _: &dyn Model, _: &HostBatch, _: &mut PagedKvCache) -> Result<Option<Tensor>> {
            match *self {}
        }
    }
}
