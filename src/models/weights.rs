//! Locates and validates a folder's safetensors files (single or sharded) and memory-maps them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{read_text, LoadError};

/// The validated weight files of one model folder.
#[derive(Debug)]
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    num_params: usize,
    /// Parameters per safetensors dtype name (`F32`, `BF16`, ...).
    params_by_dtype: Vec<(String, usize)>,
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
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
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
            for (_, view) in st.tensors() {
                let n = view.shape().iter().product::<usize>();
                num_params += n;
                let dtype = format!("{:?}", view.dtype());
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
        let dtype = self
            .params_by_dtype
            .iter()
            .max_by_key(|(_, n)| *n)
            .map_or_else(String::new, |(d, _)| d.clone());
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

    /// A memory-mapped `VarBuilder` converting tensors to `dtype` on `device` as they are read.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, LoadError> {
        // SAFETY: as in `open`; the files are read-only for the process lifetime.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.paths, dtype, device) }.map_err(|e| LoadError::Malformed {
            file: self.describe(),
            reason: e.to_string(),
        })
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
