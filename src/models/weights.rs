//! Locates and validates a folder's safetensors files (single or sharded) and memory-maps them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{read_text, LoadError};

/// The validated weight files of one model folder.
#[derive(Debug)]
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    num_params: usize,
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
        for path in &paths {
            // SAFETY: the file is only read; mlxd never writes model files while serving them.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| LoadError::Malformed {
                file: path.display().to_string(),
                reason: format!("not a valid safetensors file ({e})"),
            })?;
            num_params += st
                .tensors()
                .iter()
                .map(|(_, view)| view.shape().iter().product::<usize>())
                .sum::<usize>();
        }
        Ok(Self { paths, num_params })
    }

    /// Parameters over all files.
    pub fn num_params(&self) -> usize {
        self.num_params
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
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, LoadError> {
        // SAFETY: as in `open`; the files are read-only for the process lifetime.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.paths, dtype, device) }.map_err(|e| {
            LoadError::Malformed {
                file: self.describe(),
                reason: e.to_string(),
            }
        })
    }
}

fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let text = read_text(index, "sharded weight index")?;
    let malformed = |reason: String| LoadError::Malformed {
        file: index.display().to_string(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
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
