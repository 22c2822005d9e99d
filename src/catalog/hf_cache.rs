//! The Hugging Face hub cache: `models--<org>--<name>/refs/<branch>` holds a commit,
//! `snapshots/<commit>/` the files. Read offline, as `huggingface_hub` lays it out.

use std::path::{Path, PathBuf};

use super::{CatalogEntry, Origin};

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, when it exists.
pub fn default_hf_cache() -> Option<PathBuf> {
    let dir = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))?;
    dir.is_dir().then_some(dir)
}

/// Every model repository of the cache whose `main` snapshot is a model folder.
pub fn list(hub: &Path) -> Vec<CatalogEntry> {
    let Ok(read) = std::fs::read_dir(hub) else {
        return Vec::new();
    };
    let mut entries: Vec<CatalogEntry> = read
        .flatten()
        .filter_map(|d| {
            let dir_name = d.file_name().to_string_lossy().into_owned();
            let repo = dir_name.strip_prefix("models--")?.replacen("--", "/", 1);
            resolve(hub, &repo)
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// `org/name` (its `main` snapshot) or `org/name@revision` (a branch, tag or commit).
pub fn resolve(hub: &Path, spec: &str) -> Option<CatalogEntry> {
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = repo.split_once('/')?;
    let dir = hub.join(format!("models--{org}--{name}"));
    let commit = std::fs::read_to_string(dir.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = dir.join("snapshots").join(commit);
    if !snapshot.join("config.json").is_file() {
        return None;
    }
    Some(CatalogEntry {
        name: spec.to_string(),
        path: snapshot,
        origin: Origin::HuggingFace,
        ollama: None,
        mmproj: None,
    })
}
