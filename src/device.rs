//! The compute device: which one the engine owns (`--device`), and what it can tell about its
//! memory. The one place that knows which backends this binary was built with; everything
//! else takes a `candle_core::Device`. (An MLX backend would slot in here.)

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// The device asked for on the command line or in the config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA GPU when this binary has CUDA and the machine a GPU; else the CPU.
    #[default]
    Auto,
    /// The host CPU.
    Cpu,
    /// CUDA GPU number N.
    Cuda(usize),
    /// Apple GPU number N.
    Metal(usize),
}

/// A device that cannot be had: the binary lacks the backend, or the machine the device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `--device` is not one of the accepted spellings.
    #[error("unknown device '{0}' (use auto, cpu, cuda, cuda:N, metal or metal:N)")]
    Unknown(String),
    /// The binary was built without the backend.
    #[error("{device} was requested but this mlxd was built without the `{feature}` cargo feature")]
    NotBuilt {
        /// The device asked for.
        device: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// The backend is built but the device is not there.
    #[error("{device} is not available on this machine: {reason}")]
    Missing {
        /// The device asked for.
        device: String,
        /// What the driver said.
        reason: String,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ordinal = |rest: &str| -> Result<usize, DeviceError> {
            match rest {
                "" => Ok(0),
                r => r
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| DeviceError::Unknown(s.to_string())),
            }
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            _ if lower.starts_with("cuda") => Ok(Self::Cuda(ordinal(&lower[4..])?)),
            _ if lower.starts_with("metal") => Ok(Self::Metal(ordinal(&lower[5..])?)),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// Opens CUDA device `n` on a stream of its own (CUDA graphs cannot be captured on the default
/// stream) with cudarc's per-buffer event tracking off: the engine thread issues everything on
/// this one stream, so there is nothing for those events to order, and recording them costs
/// every kernel launch.
#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let device = candle_core::CudaDevice::new_with_stream(n)?;
    // SAFETY: every tensor on this device is used from the engine thread's one stream.
    unsafe { device.disable_event_tracking() };
    Ok(Device::Cuda(device))
}

/// Without the `cuda` feature there is no CUDA device to open (candle says so).
#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    Device::new_cuda(n)
}

impl DeviceChoice {
    /// Opens the device. `Auto` falls back to the CPU when no GPU can be opened.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = open_cuda(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NotBuilt {
                        device: self.to_string(),
                        feature: "cuda",
                    });
                }
                open_cuda(n).map_err(|e| DeviceError::Missing {
                    device: self.to_string(),
                    reason: e.to_string(),
                })
            }
            Self::Metal(n) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotBuilt {
                        device: self.to_string(),
                        feature: "metal",
                    });
                }
                Device::new_metal(n).map_err(|e| DeviceError::Missing {
                    device: self.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// The compute dtype when none is asked for: f32 on the CPU (candle's bf16 matmuls are ~30x
/// slower there than f32), bf16 on a GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A short name for logs: `cpu`, `cuda:0`, `metal:0`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda:{}", ordinal(device)),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(feature = "cuda")]
fn ordinal(device: &Device) -> usize {
    device
        .as_cuda_device()
        .map_or(0, |d| d.cuda_stream().context().ordinal())
}

#[cfg(not(feature = "cuda"))]
fn ordinal(_: &Device) -> usize {
    0
}

/// Free and total bytes of device memory; None for host memory (see `config` for RAM).
#[cfg(feature = "cuda")]
pub fn memory_info(device: &Device) -> Option<(u64, u64)> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// Free and total bytes of device memory; None for host memory (see `config` for RAM).
#[cfg(not(feature = "cuda"))]
pub fn memory_info(_: &Device) -> Option<(u64, u64)> {
    None
}

/// Runs `f` (an engine step) where its CPU work is cheapest to spread: on the CPU, on a thread
/// of the compute pool, so each parallel product inside it shares work with the other pool
/// threads directly instead of waking them from the engine thread and sleeping until they
/// finish (a context switch per product, about 170 per token); elsewhere in place (a GPU
/// context stays bound to the engine thread).
#[cfg(not(feature = "cuda"))]
pub fn on_compute_threads<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Runs `f` (an engine step) in place: a CUDA build's engine state holds CUDA graphs, which
/// must stay on the engine thread, so its steps never move to the compute pool (a CUDA build
/// serving from the CPU keeps the per-product wake-ups).
#[cfg(feature = "cuda")]
pub fn on_compute_threads<R>(_device: &Device, f: impl FnOnce() -> R) -> R {
    f()
}

/// Hands heap memory freed by an unloaded model back to the system: glibc keeps freed small
/// allocations (a tokenizer's hundreds of thousands of them) in its arenas otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hands heap memory freed by an unloaded model back to the system (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed_memory() {}

/// Parses a dtype name as used on the command line and in config files.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spellings_parse() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("metal:1".parse(), Ok(DeviceChoice::Metal(1)));
        for bad in ["gpu", "cuda:x", "cuda3", "tpu:0"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_is_the_cpu_without_a_gpu_backend() {
        if !candle_core::utils::cuda_is_available() {
            assert!(DeviceChoice::Auto.open().expect("cpu").is_cpu());
            let err = DeviceChoice::Cuda(0).open().expect_err("no cuda in this build");
            assert!(err.to_string().contains("`cuda` cargo feature"), "{err}");
        }
    }
}
