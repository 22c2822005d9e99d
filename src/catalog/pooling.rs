//! The pooling (`request::Pooling`) an embedding model declares for itself:
//! sentence-transformers' `modules.json` and its pooling module's `config.json` in a Hugging
//! Face folder, `<arch>.pooling_type` in a GGUF file.

use std::path::Path;

use crate::request::Pooling;

/// The pooling the model at `path` declares, if any.
pub fn declared_pooling(path: &Path) -> Option<Pooling> {
    if crate::formats::is_gguf(path) {
        return gguf_pooling(path);
    }
    let modules: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("modules.json")).ok()?).ok()?;
    let module = modules.as_array()?.iter().find(|m| {
        m.get("type")
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.ends_with("Pooling"))
    })?;
    let dir = path.join(module.get("path")?.as_str()?);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()?;
    let on = |key: &str| config.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
    if on("pooling_mode_lasttoken") {
        Some(Pooling::Last)
    } else if on("pooling_mode_cls_token") {
        Some(Pooling::First)
    } else if on("pooling_mode_mean_tokens") {
        Some(Pooling::Mean)
    } else {
        None
    }
}

/// llama.cpp's `<arch>.pooling_type`: 1 mean, 2 cls, 3 last.
fn gguf_pooling(path: &Path) -> Option<Pooling> {
    let mut file = std::fs::File::open(path).ok()?;
    let content = crate::formats::gguf_header::GgufHeader::read(&mut file).ok()?;
    let arch = content.metadata.get("general.architecture")?.to_string().ok()?.clone();
    match content.metadata.get(&format!("{arch}.pooling_type"))?.to_u32().ok()? {
        1 => Some(Pooling::Mean),
        2 => Some(Pooling::First),
        3 => Some(Pooling::Last),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_transformers_folders_declare_their_pooling() {
        let dir = std::env::temp_dir().join(format!("mlxd-pooling-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).expect("dir");
        assert_eq!(declared_pooling(&dir), None);
        std::fs::write(
            dir.join("modules.json"),
            r#"[{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#,
        )
        .expect("modules");
        std::fs::write(
            dir.join("1_Pooling/config.json"),
            r#"{"pooling_mode_mean_tokens": false, "pooling_mode_lasttoken": true}"#,
        )
        .expect("config");
        assert_eq!(declared_pooling(&dir), Some(Pooling::Last));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
