//! Locates and validates a folder's safetensors files (single or sharded) and memory-maps them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::{read_text, LoadError};

/// The validated weight files of one model folder.
#[derive(Debug)]
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    num_params: usize,
    /// Parameters per storage kind (`F32`, `BF16`, ..., `MLX` for packed weights).
    params_by_dtype: Vec<(String, usize)>,
    /// `quantization` of config.json (MLX folders).
    quantization: Option<serde_json::Value>,
}

/// What the weights are, as model listings report it.
#[derive(Clone, Debug)]
pub struct WeightsSummary {
    /// Container format, e.g. `safetensors`.
    pub format: &'static str,
    /// Dtype holding most parameters, e.g. `F32`, `BF16`.
    pub dtype: String,
    /// Bytes of all weight files.
    pub num_bytes: u64,
    /// Newest modification time of the weight files.
    pub modified: Option<SystemTime>,
    /// sha256 (hex) of config.json and every weight file's header: identifies the model
    /// without reading gigabytes of weights at start.
    pub digest: String,
}

impl WeightFiles {
    /// Finds `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir` and checks
    /// every file's header, so a truncated or corrupt file fails here with its name.
    /// `quantization` is config.json's MLX quantization object, if any: it gives the group size
    /// needed to count the parameters of packed tensors.
    pub fn open(dir: &Path, quantization: Option<&serde_json::Value>) -> Result<Self, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths = if index.exists() {
            shard_paths(dir, &index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(LoadError::Missing {
                path: single,
                what: "model weights (model.safetensors or model.safetensors.index.json)".into(),
            });
        };
        let mut num_params = 0;
        let mut params_by_dtype: Vec<(String, usize)> = Vec::new();
        for path in &paths {
            // SAFETY: the file is only read; mlxd never writes model files while serving them.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| LoadError::Malformed {
                file: path.display().to_string(),
                reason: format!("not a valid safetensors file ({e})"),
            })?;
            let tensors = st.tensors();
            let shape_of = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, v)| v.shape().to_vec());
            for (name, view) in &tensors {
                let Some((n, dtype)) = count_params(name, view, quantization, &shape_of) else {
                    continue;
                };
                if !["F32", "F16", "BF16", "F64", "MLX", "MXFP4"].contains(&dtype.as_str()) {
                    return Err(LoadError::Malformed {
                        file: path.display().to_string(),
                        reason: format!(
                            "tensor `{name}` is {dtype}; weights must be F32, F16 or BF16 (or MLX-packed U32 \
                             with scales and biases, or MXFP4 U8 `_blocks` with `_scales`)"
                        ),
                    });
                }
                num_params += n;
                match params_by_dtype.iter_mut().find(|(d, _)| *d == dtype) {
                    Some((_, count)) => *count += n,
                    None => params_by_dtype.push((dtype, n)),
                }
            }
        }
        Ok(Self {
            paths,
            num_params,
            params_by_dtype,
            quantization: quantization.cloned(),
        })
    }

    /// Parameters over all files.
    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Format, dominant dtype, size, modification time and digest of the weights.
    pub fn summary(&self, config_json: &str) -> Result<WeightsSummary, LoadError> {
        let mut hasher = Sha256::new();
        hasher.update(config_json.as_bytes());
        let (mut num_bytes, mut modified) = (0, None);
        for path in &self.paths {
            let io = |source| LoadError::Io {
                path: path.clone(),
                source,
            };
            let meta = std::fs::metadata(path).map_err(io)?;
            num_bytes += meta.len();
            modified = modified.max(meta.modified().ok());
            hasher.update(safetensors_header(path).map_err(io)?);
        }
        let dominant = self
            .params_by_dtype
            .iter()
            .max_by_key(|(_, n)| *n)
            .map_or_else(String::new, |(d, _)| d.clone());
        let dtype = match (&self.quantization, dominant.as_str()) {
            (Some(q), "MLX") => mlx_label(q),
            _ => dominant,
        };
        Ok(WeightsSummary {
            format: "safetensors",
            dtype,
            num_bytes,
            modified,
            digest: format!("{:x}", hasher.finalize()),
        })
    }

    /// The file names, for error messages.
    pub fn describe(&self) -> String {
        self.paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A memory-mapped `VarBuilder` converting tensors to `dtype` on `device` as they are read,
    /// each tensor's mapped pages given back once it is read (`ReleasingSafetensors`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, LoadError> {
        // SAFETY: as in `open`; the files are read-only for the process lifetime.
        let files = unsafe { MmapedSafetensors::multi(&self.paths) }.map_err(|e| LoadError::Malformed {
            file: self.describe(),
            reason: e.to_string(),
        })?;
        Ok(VarBuilder::from_backend(
            Box::new(ReleasingSafetensors(files)),
            dtype,
            device.clone(),
        ))
    }
}

/// Memory-mapped safetensors files whose pages of a tensor leave the process's resident set
/// once the tensor is read. Every tensor is copied as it loads (and repacked for the CPU
/// kernels), so without this the mapped files stay resident beside their copies until the
/// load ends: an MLX 4-bit folder peaked at 1.8× llama.cpp's RSS.
struct ReleasingSafetensors(MmapedSafetensors);

impl ReleasingSafetensors {
    /// Gives back the mapped pages of `name` (read again from the file if touched again).
    fn release(&self, name: &str) {
        if let Ok(view) = self.0.get(name) {
            release_pages(view.data());
        }
    }
}

impl SimpleBackend for ReleasingSafetensors {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get(&self.0, s, name, h, dtype, dev);
        self.release(name);
        tensor
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get_unchecked(&self.0, name, dtype, dev);
        self.release(name);
        tensor
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.0, name)
    }
}

/// Drops the whole pages inside `bytes`, part of a read-only shared file mapping, from the
/// resident set (`MADV_DONTNEED`); a later read faults them in from the file, unchanged.
#[cfg(unix)]
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    let (first, last) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    let (start, end) = (first.next_multiple_of(page), last / page * page);
    if end > start {
        // SAFETY: [start, end) is whole pages inside a live read-only shared file mapping (the
        // tensor's bytes, already copied out); dropping them loses nothing the file lacks.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Elsewhere the pages stay until the load ends.
#[cfg(not(unix))]
fn release_pages(_bytes: &[u8]) {}

impl WeightsSummary {
    /// The summary of a GGUF file: its dominant ggml type, size and a digest of its header.
    pub fn of_gguf(path: &Path, store: &super::gguf::GgufStore) -> std::io::Result<Self> {
        use std::io::Read;
        let meta = std::fs::metadata(path)?;
        let mut head = Vec::new();
        std::fs::File::open(path)?.take(1 << 20).read_to_end(&mut head)?;
        Ok(Self {
            format: "gguf",
            dtype: store.dominant_type().to_uppercase(),
            num_bytes: meta.len(),
            modified: meta.modified().ok(),
            digest: format!("{:x}", Sha256::digest(&head)),
        })
    }
}

/// Parameters a tensor holds and its storage kind; packed MLX weights count their unpacked
/// values and their `scales`/`biases` count nothing.
fn count_params(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    quantization: Option<&serde_json::Value>,
    shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
) -> Option<(usize, String)> {
    let elements = view.shape().iter().product::<usize>();
    // Hugging Face's MXFP4 pairs (gpt-oss experts): two values per `_blocks` byte; the
    // `_scales` beside them are not parameters.
    if name
        .strip_suffix("_blocks")
        .is_some_and(|b| shape_of(&format!("{b}_scales")).is_some())
    {
        let kind = match view.dtype() {
            safetensors::Dtype::U8 => "MXFP4".to_string(),
            other => format!("{other:?}"),
        };
        return Some((2 * elements, kind));
    }
    if name
        .strip_suffix("_scales")
        .is_some_and(|b| shape_of(&format!("{b}_blocks")).is_some())
    {
        return None;
    }
    let base = name.strip_suffix(".weight");
    let packed_scales = base.and_then(|b| shape_of(&format!("{b}.scales")));
    if let (Some(base), Some(scales), safetensors::Dtype::U32) = (base, &packed_scales, view.dtype()) {
        let group_size = quantization
            .and_then(|q| {
                q.get(base)
                    .and_then(|m| m["group_size"].as_u64())
                    .or(q["group_size"].as_u64())
            })
            .unwrap_or(64) as usize;
        let (rows, groups) = (scales.first().copied()?, scales.get(1).copied()?);
        return Some((rows * groups * group_size, "MLX".into()));
    }
    let quant_meta = ["scales", "biases"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|b| b.strip_suffix('.'))
            .is_some_and(|b| shape_of(&format!("{b}.weight")).is_some())
    });
    if quant_meta && quantization.is_some() {
        return None;
    }
    Some((elements, format!("{:?}", view.dtype())))
}

/// `MLX-4bit-g64`, or `MLX-mixed-3/6bit-g64` when modules use several widths, or `MLX-mxfp4`.
fn mlx_label(q: &serde_json::Value) -> String {
    if q["mode"] == "mxfp4" {
        return "MLX-mxfp4".into();
    }
    let group = q["group_size"].as_u64().unwrap_or(64);
    let mut bits: Vec<u64> = q["bits"].as_u64().into_iter().collect();
    if let Some(obj) = q.as_object() {
        bits.extend(obj.values().filter_map(|v| v.get("bits")?.as_u64()));
    }
    bits.sort_unstable();
    bits.dedup();
    match bits.as_slice() {
        [b] => format!("MLX-{b}bit-g{group}"),
        many => format!(
            "MLX-mixed-{}bit-g{group}",
            many.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
        ),
    }
}

/// The 8-byte length prefix and JSON header of a safetensors file.
fn safetensors_header(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len).min(100 << 20);
    let mut header = len.to_vec();
    file.take(n).read_to_end(&mut header)?;
    Ok(header)
}

fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let text = read_text(index, "sharded weight index")?;
    let malformed = |reason: String| LoadError::Malformed {
        file: index.display().to_string(),
        reason,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| malformed("no `weight_map` object".into()))?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if files.is_empty() {
        return Err(malformed("`weight_map` lists no files".into()));
    }
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(f);
            if p.exists() {
                Ok(p)
            } else {
                Err(LoadError::Missing {
                    path: p,
                    what: format!("weight shard listed in {}", index.display()),
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor read again after its pages were given back reads the same (they fault in
    /// from the file): large enough to span whole pages.
    #[test]
    fn a_released_tensor_reads_the_same_again() -> candle_core::Result<()> {
        let dir = std::env::temp_dir().join(format!("mlxd-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("model.safetensors");
        let values: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5).collect();
        let small = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let big = Tensor::from_vec(values.clone(), (200, 200), &Device::Cpu)?;
        candle_core::safetensors::save(&[("big", big), ("small", small)].into_iter().collect(), &path)?;
        // SAFETY: the test's own file, not written while mapped.
        let files = ReleasingSafetensors(unsafe { MmapedSafetensors::multi(&[&path]) }?);
        for _ in 0..2 {
            let read = SimpleBackend::get(
                &files,
                (200, 200).into(),
                "big",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )?;
            assert_eq!(read.flatten_all()?.to_vec1::<f32>()?, values);
            let small = SimpleBackend::get_unchecked(&files, "small", DType::F32, &Device::Cpu)?;
            assert_eq!(small.to_vec1::<f32>()?, [1., 2., 3.]);
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
