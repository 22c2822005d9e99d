//! A `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, the way
//! llama.cpp's converter wrote it: SentencePiece-style vocabularies (`llama`: pieces, scores,
//! types), byte-level BPE ones (`gpt2`: tokens and merges, with a named pre-tokenizer) and
//! Gemma 4's SentencePiece-style BPE (`gemma4`: tokens and merges).
//!
//! Written by hand: no crate converts GGUF vocabularies; the JSON built here is the
//! `tokenizer.json` the Hugging Face converters write for the same families.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

const SPIECE_UNDERLINE: &str = "\u{2581}";
/// GGUF token types.
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's pre-tokenizer regex (`llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2/2.5/3's pre-tokenizer regex (`qwen2`): single digits.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's (o200k: gpt-oss, `gpt-4o`), as its tokenizer.json writes it: words split at case
/// changes with their contractions, digits in threes.
const O200K_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's regex (`gpt2`, `default` byte-level).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The vocabulary fields of GGUF metadata.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
}

fn strings(meta: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, String> {
    let values = meta
        .get(key)
        .ok_or_else(|| format!("missing `{key}`"))?
        .to_vec()
        .map_err(|e| format!("`{key}`: {e}"))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| format!("`{key}`: {e}")))
        .collect()
}

fn numbers(meta: &HashMap<String, Value>, key: &str) -> Vec<f64> {
    meta.get(key)
        .and_then(|v| v.to_vec().ok())
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    v.to_f32()
                        .map(f64::from)
                        .or_else(|_| v.to_i32().map(f64::from))
                        .or_else(|_| v.to_u32().map(f64::from))
                        .unwrap_or(0.0)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A metadata integer (any integer width).
pub fn meta_u32(meta: &HashMap<String, Value>, key: &str) -> Option<u32> {
    let v = meta.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().map(|x| x as u32))
        .or_else(|| v.to_u64().ok().map(|x| x as u32))
}

/// A metadata boolean.
pub fn meta_bool(meta: &HashMap<String, Value>, key: &str) -> Option<bool> {
    meta.get(key)?.to_bool().ok()
}

/// Builds the `tokenizer.json` document for the GGUF vocabulary.
pub fn tokenizer_json(meta: &HashMap<String, Value>) -> Result<Json, String> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or("missing `tokenizer.ggml.model`")?
        .clone();
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = numbers(meta, "tokenizer.ggml.token_type")
        .into_iter()
        .map(|t| t as i32)
        .collect();
    let types = if types.len() == tokens.len() {
        types
    } else {
        vec![TYPE_NORMAL; tokens.len()]
    };
    let scores = numbers(meta, "tokenizer.ggml.scores")
        .into_iter()
        .map(|s| s as f32)
        .collect();
    let vocab = Vocab { tokens, types, scores };
    let mut doc = match model.as_str() {
        "llama" => spm_json(meta, &vocab)?,
        "gpt2" => bpe_json(meta, &vocab, "default")?,
        // Gemma 4's own model name: SentencePiece-style BPE with stored merges.
        "gemma4" => bpe_json(meta, &vocab, "gemma4")?,
        other => {
            return Err(format!(
                "tokenizer model `{other}` is not supported (supported: llama, gpt2, gemma4)"
            ))
        }
    };
    doc["added_tokens"] = added_tokens(&vocab);
    // llama.cpp always adds BOS for Gemma 4, whatever the file says.
    doc["post_processor"] = post_processor(meta, &vocab, model == "gemma4");
    Ok(doc)
}

fn added_tokens(v: &Vocab) -> Json {
    let added: Vec<Json> = v
        .tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(id, (content, t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t != TYPE_USER_DEFINED})
        })
        .collect();
    Json::Array(added)
}

/// BOS (and EOS) around every sequence, as `add_bos_token` / `add_eos_token` say (BOS always
/// with `always_bos`).
fn post_processor(meta: &HashMap<String, Value>, v: &Vocab, always_bos: bool) -> Json {
    let token = |key: &str| meta_u32(meta, key).and_then(|id| Some((id, v.tokens.get(id as usize)?.clone())));
    let bos = token("tokenizer.ggml.bos_token_id")
        .filter(|_| always_bos || meta_bool(meta, "tokenizer.ggml.add_bos_token").unwrap_or(false));
    let eos = token("tokenizer.ggml.eos_token_id")
        .filter(|_| meta_bool(meta, "tokenizer.ggml.add_eos_token").unwrap_or(false));
    if bos.is_none() && eos.is_none() {
        return Json::Null;
    }
    let special = |t: &(u32, String), type_id: u32| json!({"SpecialToken": {"id": t.1, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    for t in bos.iter().chain(eos.iter()) {
        special_tokens.insert(t.1.clone(), json!({"id": t.1, "ids": [t.0], "tokens": [t.1]}));
    }
    if let Some(b) = &bos {
        single.push(special(b, 0));
        pair.push(special(b, 0));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(e) = &eos {
        single.push(special(e, 0));
        pair.push(special(e, 0));
    }
    if let Some(b) = &bos {
        pair.push(special(b, 1));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some(e) = &eos {
        pair.push(special(e, 1));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

/// SentencePiece BPE with byte fallback; merges derived from the piece scores (every split of a
/// normal piece into two pieces, ranked by the merged piece's score), as the HF converters do.
fn spm_json(meta: &HashMap<String, Value>, v: &Vocab) -> Result<Json, String> {
    let add_space_prefix = meta_bool(meta, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let unk = meta_u32(meta, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| v.tokens.get(id as usize))
        .cloned();
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(v.tokens.len());
    for (i, t) in v.tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut found: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, piece) in v.tokens.iter().enumerate() {
        if v.types[i] != TYPE_NORMAL || piece.chars().count() < 2 {
            continue;
        }
        let score = v.scores.get(i).copied().unwrap_or(0.0);
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..cut]), ids.get(&piece[cut..])) {
                found.push((-score, i, l, r));
            }
        }
    }
    found.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges: Vec<String> = found
        .iter()
        .map(|&(_, _, l, r)| format!("{} {}", v.tokens[l], v.tokens[r]))
        .collect();
    let vocab: serde_json::Map<String, Json> = ids.iter().map(|(t, i)| (t.to_string(), json!(i))).collect();
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": SPIECE_UNDERLINE}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "vocab": vocab, "merges": merges},
    }))
}

/// Byte-level BPE (or, for `gemma4`, SentencePiece-style BPE) with the merges stored in the
/// file and the pre-tokenizer named by `tokenizer.ggml.pre` (`default_pre` without one).
fn bpe_json(meta: &HashMap<String, Value>, v: &Vocab, default_pre: &str) -> Result<Json, String> {
    let merges = strings(meta, "tokenizer.ggml.merges")?;
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(|p| p.to_string().ok())
        .map_or(default_pre, String::as_str);
    let vocab: serde_json::Map<String, Json> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    let byte_level_decoder =
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let (normalizer, pre_tokenizer, decoder, ignore_merges, byte_fallback) = match pre {
        "llama-bpe" | "llama3" => (Json::Null, byte_level(LLAMA3_REGEX), byte_level_decoder, true, false),
        "qwen2" => (
            json!({"type": "NFC"}),
            byte_level(QWEN2_REGEX),
            byte_level_decoder,
            false,
            false,
        ),
        "gpt2" | "default" => (Json::Null, byte_level(GPT2_REGEX), byte_level_decoder, false, false),
        // llama.cpp applies the merges for it (no whole-word shortcut), so mlxd does.
        "gpt-4o" => (Json::Null, byte_level(O200K_REGEX), byte_level_decoder, false, false),
        "gemma4" => (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}),
            Json::Null,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]}),
            false,
            true,
        ),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (supported: llama-bpe, qwen2, gpt2, gpt-4o, gemma4)"
            ))
        }
    };
    let unk = meta_u32(meta, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| v.tokens.get(id as usize))
        .cloned();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }))
}
