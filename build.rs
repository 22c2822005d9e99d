//! Compiles mlxd's own CUDA kernels (`src/compute/cuda/kernels.cu`, which includes `moe.cuh`)
//! to PTX when the `cuda` feature is on, with candle's kernel builder (nvcc from CUDA_ROOT / PATH, the GPU generation
//! from CUDA_COMPUTE_CAP). Without the feature there is nothing to build.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/compute/cuda/moe.cuh");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        cudaforge::KernelBuilder::new()
            .source_files(["src/compute/cuda/kernels.cu"])
            .arg("--expt-relaxed-constexpr")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("ptx.rs")))
            .expect("compiling src/compute/cuda/kernels.cu with nvcc");
    }
}
