//! Ollama's local store: `manifests/<registry>/<namespace>/<name>/<tag>` (JSON) whose layers
//! point at `blobs/sha256-<hex>`: the GGUF weights, the default parameters, the system prompt.
//! Ollama's Go chat template is not used: the GGUF's own Jinja template is.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{CatalogEntry, Origin};

const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const PARAMS_LAYER: &str = "application/vnd.ollama.image.params";
const SYSTEM_LAYER: &str = "application/vnd.ollama.image.system";
/// A vision model's projector (llama.cpp's mmproj file), beside the model layer.
const PROJECTOR_LAYER: &str = "application/vnd.ollama.image.projector";

/// What a manifest adds to its GGUF blob.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OllamaModel {
    /// The weights blob's sha256 (hex), checked on first load.
    pub digest: String,
    /// Default options (`stop`, `temperature`, …), under the request's own.
    pub params: Map<String, Value>,
    /// The default system prompt.
    pub system: Option<String>,
}

/// `OLLAMA_MODELS`, else `~/.ollama/models`, when it exists.
pub fn default_ollama_store() -> Option<PathBuf> {
    let dir = std::env::var_os("OLLAMA_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ollama/models")))?;
    dir.join("manifests").is_dir().then_some(dir)
}

/// Every model of the store at `root`.
pub fn list(root: &Path) -> Vec<CatalogEntry> {
    let mut entries = Vec::new();
    let manifests = root.join("manifests");
    for registry in subdirs(&manifests) {
        for namespace in subdirs(&registry) {
            for model in subdirs(&namespace) {
                let Ok(tags) = std::fs::read_dir(&model) else { continue };
                for tag in tags.flatten().map(|t| t.path()).filter(|p| p.is_file()) {
                    let name = display_name(&[&registry, &namespace, &model, &tag]);
                    match entry(root, &tag, name.clone()) {
                        Some(e) => entries.push(e),
                        None => {
                            tracing::warn!(manifest = %tag.display(), "skipping an Ollama manifest without a readable model layer")
                        }
                    }
                }
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// The entry for an Ollama name (`qwen2.5:0.5b`, `library/qwen2.5`, `host/ns/model:tag`).
pub fn resolve(root: &Path, name: &str) -> Option<CatalogEntry> {
    let (path, tag) = match name.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
        Some((path, tag)) => (path, tag),
        None => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (registry, namespace, model) = match parts.as_slice() {
        [model] => (DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *model),
        [namespace, model] => (DEFAULT_REGISTRY, *namespace, *model),
        [registry, namespace, model] => (*registry, *namespace, *model),
        _ => return None,
    };
    let manifest = root
        .join("manifests")
        .join(registry)
        .join(namespace)
        .join(model)
        .join(tag);
    manifest.is_file().then_some(())?;
    let name = display_name(&[
        Path::new(registry),
        Path::new(namespace),
        Path::new(model),
        Path::new(tag),
    ]);
    entry(root, &manifest, name)
}

/// `model:tag` for the default registry's library, `namespace/model:tag` for its other
/// namespaces, the whole path otherwise (as `ollama list` shows them).
fn display_name(parts: &[&Path; 4]) -> String {
    let s = |p: &Path| {
        p.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    let (registry, namespace, model, tag) = (s(parts[0]), s(parts[1]), s(parts[2]), s(parts[3]));
    match (registry.as_str(), namespace.as_str()) {
        (DEFAULT_REGISTRY, DEFAULT_NAMESPACE) => format!("{model}:{tag}"),
        (DEFAULT_REGISTRY, _) => format!("{namespace}/{model}:{tag}"),
        _ => format!("{registry}/{namespace}/{model}:{tag}"),
    }
}

fn entry(root: &Path, manifest: &Path, name: String) -> Option<CatalogEntry> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(manifest).ok()?).ok()?;
    let layers = doc.get("layers")?.as_array()?;
    let blob = |media: &str| -> Option<(String, PathBuf)> {
        let layer = layers
            .iter()
            .find(|l| l.get("mediaType").and_then(Value::as_str) == Some(media))?;
        let hex = layer.get("digest")?.as_str()?.strip_prefix("sha256:")?.to_string();
        let path = root.join("blobs").join(format!("sha256-{hex}"));
        Some((hex, path))
    };
    let (digest, weights) = blob(MODEL_LAYER)?;
    let params = blob(PARAMS_LAYER)
        .and_then(|(_, p)| serde_json::from_str::<Value>(&std::fs::read_to_string(p).ok()?).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let system = blob(SYSTEM_LAYER).and_then(|(_, p)| std::fs::read_to_string(p).ok());
    Some(CatalogEntry {
        name,
        path: weights,
        origin: Origin::Ollama,
        ollama: Some(OllamaModel { digest, params, system }),
        mmproj: blob(PROJECTOR_LAYER).map(|(_, p)| p),
    })
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Checks a blob against its sha256 digest (hex).
pub fn verify_digest(path: &Path, digest: &str) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual == digest {
        Ok(())
    } else {
        Err(format!(
            "{}: its sha256 is {actual}, not the manifest's {digest}: the blob is corrupt or incomplete",
            path.display()
        ))
    }
}
