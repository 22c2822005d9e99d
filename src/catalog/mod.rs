//! What `mlxd serve` can serve, by name, without loading anything: the models given with
//! `--model` (paths, Hugging Face repository names, Ollama names), every model in
//! `--models-dir`, the Ollama store and the Hugging Face hub cache. Names resolve here; the
//! server's registry loads what a request names.

mod hf_cache;
mod ollama_store;
pub mod pooling;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use hf_cache::default_hf_cache;
pub use ollama_store::{default_ollama_store, verify_digest, OllamaModel};

/// Where an entry was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A `--model` path.
    Path,
    /// A folder or `.gguf` file in `--models-dir`.
    ModelsDir,
    /// The Ollama store.
    Ollama,
    /// The Hugging Face hub cache.
    HuggingFace,
}

impl Origin {
    /// A short name for listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Path => "path",
            Origin::ModelsDir => "models-dir",
            Origin::Ollama => "ollama",
            Origin::HuggingFace => "huggingface",
        }
    }
}

/// One model that can be served.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogEntry {
    /// The name requests use.
    pub name: String,
    /// A Hugging Face folder or a GGUF file.
    pub path: PathBuf,
    /// Where it was found.
    pub origin: Origin,
    /// What the Ollama manifest adds (parameters, system prompt, the blob's digest).
    pub ollama: Option<OllamaModel>,
    /// A GGUF model's vision tower (`--mmproj`, or an Ollama manifest's projector layer).
    pub mmproj: Option<PathBuf>,
}

/// Where to look.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `--model` values, in order (the first is the default model).
    pub models: Vec<String>,
    /// `--mmproj`: the first `--model`'s vision tower.
    pub mmproj: Option<PathBuf>,
    /// The name the first `--model` is served under (`--served-model-name`).
    pub served_name: Option<String>,
    /// `--models-dir`.
    pub models_dir: Option<PathBuf>,
    /// The Ollama store (`--ollama-models`, `OLLAMA_MODELS`, `~/.ollama/models`).
    pub ollama_store: Option<PathBuf>,
    /// The Hugging Face hub cache (`--hf-cache`, `HF_HUB_CACHE`, `HF_HOME/hub`).
    pub hf_cache: Option<PathBuf>,
}

/// A name no entry has: the names that come closest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("model '{name}' not found")]
pub struct NotFound {
    /// The name asked for.
    pub name: String,
    /// Up to three names that look like it, closest first.
    pub close: Vec<String>,
    /// The first few names that can be served (for when none is close).
    pub known: Vec<String>,
}

/// Every servable model, by name.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// Finds every model of `sources`. A `--model` that is neither a path nor a name in the
    /// caches is an error (the server should not start); unreadable caches are skipped.
    pub fn discover(sources: &Sources) -> Result<Self, String> {
        let mut entries = Vec::new();
        let hf = sources.hf_cache.as_deref();
        let store = sources.ollama_store.as_deref();
        for (i, spec) in sources.models.iter().enumerate() {
            let mut entry = explicit(spec, hf, store)?;
            if i == 0 {
                if let Some(name) = &sources.served_name {
                    entry.name = name.clone();
                }
                if let Some(mmproj) = &sources.mmproj {
                    entry.mmproj = Some(mmproj.clone());
                }
            }
            entries.push(entry);
        }
        if let Some(dir) = &sources.models_dir {
            entries.extend(models_in_dir(dir)?);
        }
        if let Some(store) = store {
            entries.extend(ollama_store::list(store));
        }
        if let Some(hf) = hf {
            entries.extend(hf_cache::list(hf));
        }
        // The first of two entries with one name wins (`--model`s first); the other is named in
        // the log, not dropped without a word.
        let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
        entries.retain(|e| match seen.get(&e.name) {
            Some(first) => {
                if first != &e.path {
                    tracing::warn!(name = %e.name, kept = %first.display(), hidden = %e.path.display(),
                        "two models have one name: the second is not served under it");
                }
                false
            }
            None => {
                seen.insert(e.name.clone(), e.path.clone());
                true
            }
        });
        Ok(Self { entries })
    }

    /// A catalog of exactly these entries.
    pub fn of(entries: Vec<CatalogEntry>) -> Self {
        Self { entries }
    }

    /// Every entry, in discovery order (`--model`s first).
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    /// The entry a request's name means: exact, then with or without Ollama's `:latest` tag and
    /// `library/` namespace; else the closest names.
    pub fn resolve(&self, name: &str) -> Result<&CatalogEntry, NotFound> {
        let wanted = normalize(name);
        self.entries
            .iter()
            .find(|e| e.name == name)
            .or_else(|| self.entries.iter().find(|e| normalize(&e.name) == wanted))
            .ok_or_else(|| NotFound {
                name: name.to_string(),
                close: close_matches(name, self.entries.iter().map(|e| e.name.as_str())),
                known: self.entries.iter().take(10).map(|e| e.name.clone()).collect(),
            })
    }
}

/// A name without `:latest` and without Ollama's default registry and namespace.
fn normalize(name: &str) -> String {
    let name = name.strip_prefix("registry.ollama.ai/").unwrap_or(name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    name.strip_suffix(":latest").unwrap_or(name).to_lowercase()
}

/// Up to three of `names` within a small edit distance of `name`, closest first.
pub fn close_matches<'a>(name: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let wanted = normalize(name);
    let mut scored: Vec<(f64, &str)> = names
        .map(|n| (strsim::jaro_winkler(&wanted, &normalize(n)), n))
        .filter(|(score, _)| *score >= 0.7)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(3).map(|(_, n)| n.to_string()).collect()
}

/// A `--model` value: a path, else `org/name[@revision]` in the hub cache, else an Ollama name.
fn explicit(spec: &str, hf: Option<&Path>, store: Option<&Path>) -> Result<CatalogEntry, String> {
    let path = Path::new(spec);
    if path.exists() {
        if !is_model(path) {
            return Err(format!(
                "{spec}: not a model (expected a Hugging Face folder with config.json, or a .gguf file)"
            ));
        }
        return Ok(CatalogEntry {
            name: model_name(path),
            path: path.to_path_buf(),
            origin: Origin::Path,
            ollama: None,
            mmproj: None,
        });
    }
    if let Some(entry) = hf.and_then(|dir| hf_cache::resolve(dir, spec)) {
        return Ok(entry);
    }
    if let Some(entry) = store.and_then(|dir| ollama_store::resolve(dir, spec)) {
        return Ok(entry);
    }
    Err(format!(
        "{spec}: no such file, and no model of that name in the Hugging Face cache ({}) or the Ollama store ({})",
        hf.map_or("none".into(), |p| p.display().to_string()),
        store.map_or("none".into(), |p| p.display().to_string()),
    ))
}

/// A Hugging Face folder (config.json) or a GGUF file.
pub fn is_model(path: &Path) -> bool {
    path.join("config.json").is_file() || crate::formats::is_gguf(path)
}

/// Every model folder and GGUF file directly in `dir`, named after it.
fn models_in_dir(dir: &Path) -> Result<Vec<CatalogEntry>, String> {
    let read = std::fs::read_dir(dir).map_err(|e| format!("--models-dir {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = read.flatten().map(|item| item.path()).filter(|p| is_model(p)).collect();
    paths.sort();
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in paths {
        match found.entry(model_name(&path)) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(path);
            }
            std::collections::btree_map::Entry::Occupied(kept) => {
                tracing::warn!(name = %kept.key(), kept = %kept.get().display(), hidden = %path.display(),
                    "two models in --models-dir have one name (a folder and a .gguf file): the second is not served");
            }
        }
    }
    Ok(found
        .into_iter()
        .map(|(name, path)| CatalogEntry {
            name,
            path,
            origin: Origin::ModelsDir,
            ollama: None,
            mmproj: None,
        })
        .collect())
}

/// The name of a model path: the folder's name, or a GGUF file's without `.gguf`. A symlink
/// keeps its own name (not its target's); a path that names no folder itself (`.`, `..`) is
/// named after the folder it resolves to.
pub fn model_name(path: &Path) -> String {
    let path = match path.file_name() {
        Some(_) => path.to_path_buf(),
        None => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
    };
    let name = if crate::formats::is_gguf(&path) {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> CatalogEntry {
        CatalogEntry {
            name: name.into(),
            path: PathBuf::from("/nowhere"),
            origin: Origin::Path,
            ollama: None,
            mmproj: None,
        }
    }

    #[test]
    fn names_resolve_with_or_without_ollama_decorations() {
        let c = Catalog::of(vec![
            entry("qwen2.5:0.5b"),
            entry("llama3.2:latest"),
            entry("Qwen/Qwen3-0.6B"),
        ]);
        assert_eq!(
            c.resolve("library/qwen2.5:0.5b").map(|e| &e.name),
            Ok(&"qwen2.5:0.5b".to_string())
        );
        assert_eq!(
            c.resolve("llama3.2").map(|e| &e.name),
            Ok(&"llama3.2:latest".to_string())
        );
        assert_eq!(
            c.resolve("qwen/qwen3-0.6b").map(|e| &e.name),
            Ok(&"Qwen/Qwen3-0.6B".to_string())
        );
        let miss = c.resolve("qwen2.5:0.6b").expect_err("unknown");
        assert_eq!(miss.close.first().map(String::as_str), Some("qwen2.5:0.5b"));
    }
}
