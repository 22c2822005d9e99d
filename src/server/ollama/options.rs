//! Ollama's request conversion: `options` with Ollama's defaults → the API-neutral
//! `GenerationSpec` fields; every option either works, is a hardware hint with no effect
//! here (advisory), or is refused by name.

use serde_json::Value;

use super::types::{CommonFields, Options};
use super::OllamaError;
use crate::request::{GenerationSpec, MaxTokens, Prompt, SamplingParams};
use crate::server::registry::ModelLease;
use crate::text::reasoning::ThinkTags;
use crate::text::tools::{ToolChoice, ToolSet};
use crate::text::{ChatMessage, ChatPrompt, OutputConstraint};

/// Ollama's defaults for absent options (its `api.DefaultOptions`).
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_K: u32 = 40;
const DEFAULT_TOP_P: f32 = 0.9;
const DEFAULT_REPEAT_PENALTY: f32 = 1.1;
const DEFAULT_REPEAT_LAST_N: usize = 64;

/// Options that tune Ollama's runtime on its hardware (threads, GPU layers, memory mapping);
/// mlxd sizes those itself, so they change nothing here.
pub const HARDWARE_OPTIONS: [&str; 9] = [
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "use_mmap",
    "use_mlock",
    "num_thread",
    "numa",
    "vocab_only",
];

/// Sampling options mlxd does not implement, with the value that means "off": accepted at
/// that value, refused otherwise.
const OFF_VALUES: [(&str, f64); 6] = [
    ("typical_p", 1.0),
    ("tfs_z", 1.0),
    ("mirostat", 0.0),
    ("mirostat_tau", 5.0),
    ("mirostat_eta", 0.1),
    ("num_keep", -1.0),
];

/// A spec for `prompt` with the request's `options` and shared fields applied, over the
/// model's own defaults (an Ollama manifest's parameters).
pub fn to_spec(prompt: Prompt, common: &CommonFields, model: &ModelLease) -> Result<GenerationSpec, OllamaError> {
    reject_unsupported(common)?;
    let defaults = model.entry.ollama.as_ref().map(|o| &o.params);
    let opts = parse_options(&with_model_defaults(common.options.as_ref(), defaults))?;
    let mut spec = GenerationSpec::new(prompt);
    spec.sampling = sampling(&opts);
    spec.max_tokens = match opts.num_predict {
        None | Some(-1) | Some(-2) => MaxTokens::Rest,
        Some(n) if n > 0 => MaxTokens::AtMost(u32::try_from(n).unwrap_or(u32::MAX)),
        Some(n) => {
            return Err(OllamaError::bad_request(format!(
                "options.num_predict must be positive, -1 or -2, got {n}"
            )))
        }
    };
    spec.context_window = match opts.num_ctx {
        None => None,
        Some(n) if n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(n) => {
            return Err(OllamaError::bad_request(format!(
                "options.num_ctx must be positive, got {n}"
            )))
        }
    };
    spec.stop = opts.stop.clone().unwrap_or_default();
    spec.constraint = output_constraint(common.format.as_ref())?;
    Ok(spec)
}

/// Ollama's `format`: `"json"` (any JSON object), a JSON schema object, or nothing.
fn output_constraint(format: Option<&Value>) -> Result<Option<OutputConstraint>, OllamaError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(OutputConstraint::JsonObject)),
        Some(schema @ Value::Object(_)) => Ok(Some(OutputConstraint::JsonSchema(schema.clone()))),
        Some(other) => Err(OllamaError::bad_request(format!(
            "format must be \"json\" or a JSON schema object, got {other}"
        ))),
    }
}

/// A conversation with the request's tools and `think` applied (as template variables:
/// `enable_thinking`, and `reasoning_effort` for a level), and the model's own system prompt
/// (an Ollama manifest's) when the conversation has none. Thinking asked of a model whose
/// template has no thoughts is refused, as Ollama refuses it.
pub fn chat_prompt(
    mut messages: Vec<ChatMessage>,
    tools: Vec<Value>,
    common: &CommonFields,
    model: &ModelLease,
) -> Result<ChatPrompt, OllamaError> {
    let system = model.entry.ollama.as_ref().and_then(|o| o.system.clone());
    if let Some(system) = system.filter(|s| !s.is_empty()) {
        if !messages.iter().any(|m| m.role == "system") {
            messages.insert(0, ChatMessage::new("system", system));
        }
    }
    let mut chat = ChatPrompt::new(messages);
    let thinks = ThinkTags::detect(model.codec.chat_template_source().unwrap_or_default()).is_some();
    if !thinks && matches!(common.think, Some(Value::Bool(true)) | Some(Value::String(_))) {
        return Err(OllamaError::bad_request(format!(
            "\"{}\" does not support thinking (think)",
            common.model
        )));
    }
    chat.tools = ToolSet {
        choice: if tools.is_empty() {
            ToolChoice::None
        } else {
            ToolChoice::Auto
        },
        tools,
        parallel: true,
    };
    let vars = &mut chat.template_kwargs;
    match &common.think {
        None | Some(Value::Null) => {}
        Some(Value::Bool(on)) => {
            vars.insert("enable_thinking".into(), Value::Bool(*on));
        }
        Some(Value::String(level)) if ["high", "medium", "low"].contains(&level.as_str()) => {
            vars.insert("enable_thinking".into(), Value::Bool(true));
            vars.insert("reasoning_effort".into(), Value::String(level.clone()));
        }
        Some(other) => {
            return Err(OllamaError::bad_request(format!(
                "think must be true, false, \"high\", \"medium\" or \"low\", got {other}"
            )))
        }
    }
    Ok(chat)
}

/// Fields of the request body that mlxd cannot honour, refused with a clear 400.
fn reject_unsupported(common: &CommonFields) -> Result<(), OllamaError> {
    if let Some(name) = common.unknown.keys().next() {
        return Err(OllamaError::bad_request(format!(
            "unsupported field '{name}': this server does not implement it"
        )));
    }
    if common.shift == Some(true) {
        return Err(OllamaError::bad_request(
            "shift: true is not supported: this server does not shift the context while generating; a reply ends at the context's end (shift: false)",
        ));
    }
    Ok(())
}

/// Options a model's parameters may set (the ones mlxd implements); other parameters of a
/// manifest are left out rather than failing every request to the model.
const MODEL_DEFAULT_OPTIONS: [&str; 12] = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "num_predict",
    "stop",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "num_ctx",
];

/// The request's options over the model's defaults.
fn with_model_defaults(options: Option<&Value>, defaults: Option<&serde_json::Map<String, Value>>) -> Value {
    let mut merged: serde_json::Map<String, Value> = defaults
        .into_iter()
        .flatten()
        .filter(|(k, _)| MODEL_DEFAULT_OPTIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    match options {
        Some(Value::Object(o)) => merged.extend(o.clone()),
        Some(Value::Null) | None => {}
        Some(other) => return other.clone(),
    }
    Value::Object(merged)
}

fn parse_options(options: &Value) -> Result<Options, OllamaError> {
    let opts: Options = serde_json::from_value(options.clone())
        .map_err(|e| OllamaError::bad_request(format!("invalid options: {e}")))?;
    for (name, value) in &opts.unknown {
        if HARDWARE_OPTIONS.contains(&name.as_str()) {
            continue;
        }
        let off = OFF_VALUES.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        match (off, value.as_f64()) {
            (Some(off), Some(v)) if (v - off).abs() < 1e-9 => {}
            (Some(_), _) => {
                return Err(OllamaError::bad_request(format!(
                    "options.{name} is not supported (only its default, which turns it off)"
                )))
            }
            (None, _) => return Err(OllamaError::bad_request(format!("unknown option options.{name}"))),
        }
    }
    Ok(opts)
}

/// Ollama's sampling semantics: its defaults, `top_k` ≤ 0 and `repeat_last_n` -1 mean "off"
/// and "the whole sequence", a negative seed means a random one.
fn sampling(opts: &Options) -> SamplingParams {
    SamplingParams {
        temperature: opts.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k: match opts.top_k {
            None => Some(DEFAULT_TOP_K),
            Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
            Some(_) => None,
        },
        top_p: opts.top_p.unwrap_or(DEFAULT_TOP_P),
        min_p: opts.min_p.unwrap_or(0.0),
        repetition_penalty: opts.repeat_penalty.unwrap_or(DEFAULT_REPEAT_PENALTY),
        repeat_last_n: match opts.repeat_last_n {
            None => Some(DEFAULT_REPEAT_LAST_N),
            Some(n) if n >= 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(_) => None,
        },
        presence_penalty: opts.presence_penalty.unwrap_or(0.0),
        frequency_penalty: opts.frequency_penalty.unwrap_or(0.0),
        seed: opts.seed.and_then(|s| u64::try_from(s).ok()),
        logprobs: None,
        report_tokens: Vec::new(),
        prompt_logprobs: None,
        logit_bias: Vec::new(),
    }
}
