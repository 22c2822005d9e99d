//! Tool calling in each model family's own convention: which syntax a model writes its calls
//! in (found from its chat template), how calls are read back out of its output
//! (`ToolCallParser`, streaming), how a call is forced when the client requires one (a grammar
//! for the constrained decoder), and how tools reach templates that know nothing of them.

mod forced;
mod gemma;
mod generic;
mod parse;
mod parser;

pub use forced::forced_call_grammar;
pub use generic::{describe_tools_in_messages, GENERIC_INSTRUCTIONS};
pub use parse::parse_calls;
pub use parser::ToolCallParser;

use serde_json::Value;

/// How a model family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolSyntax {
    /// Qwen2.5, Qwen3, Hermes: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one
    /// block per call.
    Hermes,
    /// Llama 3.x: the whole reply is `{"name": …, "parameters": {…}}` (after an optional
    /// `<|python_tag|>`), several separated by `;`.
    Llama3,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`, or the newer
    /// `[TOOL_CALLS]name[ARGS]{…}`.
    Mistral,
    /// Phi-4-mini: `<|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>`.
    Phi4,
    /// gpt-oss's harmony format: a message to `functions.NAME` on the commentary channel,
    /// `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}<|call|>`; read
    /// with the rest of the reply by `text::reply`'s harmony parser.
    Harmony,
    /// Gemma 4: `<|tool_call>call:name{key:value,…}<tool_call|>` in its own value syntax
    /// (strings between `<|"|>` delimiters, bare keys), one block per call.
    Gemma4,
    /// A template without tool support (Gemma 3, Phi-3): mlxd describes the tools in the system
    /// message and asks for `{"name": …, "arguments": {…}}` as the whole reply.
    Generic,
}

impl ToolSyntax {
    /// The syntax a chat template's tool instructions and history rendering use.
    pub fn detect(template_source: &str) -> Self {
        let has = |s: &str| template_source.contains(s);
        if has("<|channel|>") && has("<|message|>") {
            Self::Harmony
        } else if has("<|tool_call>") {
            Self::Gemma4
        } else if has("<tool_call>") {
            Self::Hermes
        } else if has("[TOOL_CALLS]") {
            Self::Mistral
        } else if has("<|tool_call|>") || has("<|tool|>") {
            Self::Phi4
        } else if has("<|python_tag|>") || (has("tools") && has("\"parameters\"")) {
            Self::Llama3
        } else {
            Self::Generic
        }
    }

    /// The text that opens a call, and the one that closes it (None: the call runs to the end
    /// of the reply). A `{` opener only counts at the start of the reply.
    pub fn markers(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Hermes => ("<tool_call>", Some("</tool_call>")),
            Self::Mistral => ("[TOOL_CALLS]", None),
            Self::Phi4 => ("<|tool_call|>", Some("<|/tool_call|>")),
            Self::Gemma4 => ("<|tool_call>", Some("<tool_call|>")),
            Self::Harmony => (" to=functions.", Some("<|call|>")),
            Self::Llama3 | Self::Generic => ("{", None),
        }
    }

    /// The key the call's arguments go under.
    pub fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// Marker strings that may be special tokens, which the detokenizer would otherwise hide.
    pub fn special_markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &["<tool_call>", "</tool_call>"],
            Self::Mistral => &["[TOOL_CALLS]", "[ARGS]"],
            Self::Phi4 => &["<|tool_call|>", "<|/tool_call|>"],
            Self::Gemma4 => &["<|tool_call>", "<tool_call|>", gemma::QUOTE],
            Self::Harmony => &[
                "<|start|>",
                "<|channel|>",
                "<|message|>",
                "<|constrain|>",
                "<|end|>",
                "<|call|>",
                "<|return|>",
            ],
            Self::Llama3 => &["<|python_tag|>"],
            Self::Generic => &[],
        }
    }

    /// A fresh call id in the form the family's templates accept (Mistral's insist on nine
    /// alphanumeric characters).
    pub fn new_call_id(self) -> String {
        use rand::distr::{Alphanumeric, SampleString};
        match self {
            Self::Mistral => Alphanumeric.sample_string(&mut rand::rng(), 9),
            _ => format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24)),
        }
    }
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// Call id (`call_…`), for the client's tool message to answer.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments as a JSON object, compact.
    pub arguments: String,
}

/// What a request lets the model do with its tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// Call tools or answer in text, as the model decides.
    #[default]
    Auto,
    /// Answer in text; tools are not shown to the model.
    None,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Function(String),
}

/// The tools of one chat request, checked: each an OpenAI function tool
/// (`{"type": "function", "function": {"name", "description", "parameters"}}`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ToolSet {
    /// The tool objects as the template receives them.
    pub tools: Vec<Value>,
    /// What the model may do.
    pub choice: ToolChoice,
    /// More than one call per reply.
    pub parallel: bool,
}

impl ToolSet {
    /// Whether the model sees tools and its reply is parsed for calls.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// A function's name and parameter schema (an empty object schema when it has none).
    pub fn functions(&self) -> impl Iterator<Item = (&str, Value)> {
        self.tools.iter().filter_map(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?;
            let params = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Some((name, params))
        })
    }

    /// Checks every tool's shape and the choice against them; the error names the field.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, tool) in self.tools.iter().enumerate() {
            let at = |k: &str| format!("tools[{i}]{k}");
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err((at(".type"), "only tools of type 'function' are supported".into()));
            }
            let f = tool
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| (at(".function"), "a function tool needs a 'function' object".into()))?;
            match f.get("name").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => {}
                _ => return Err((at(".function.name"), "a function needs a non-empty name".into())),
            }
            if let Some(p) = f.get("parameters") {
                if !p.is_object() {
                    return Err((
                        at(".function.parameters"),
                        "parameters must be a JSON schema object".into(),
                    ));
                }
            }
        }
        match &self.choice {
            ToolChoice::Required if self.tools.is_empty() => Err((
                "tool_choice".into(),
                "'required' needs at least one tool in tools".into(),
            )),
            ToolChoice::Function(name) if !self.functions().any(|(n, _)| n == name) => Err((
                "tool_choice".into(),
                format!("names function '{name}', which is not among the tools"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_recognised_from_their_templates() {
        let dir = std::path::Path::new("../shared/tokenizers");
        let cases = [
            ("qwen2.5", ToolSyntax::Hermes),
            ("qwen3", ToolSyntax::Hermes),
            ("llama3.2", ToolSyntax::Llama3),
            ("mistral-nemo", ToolSyntax::Mistral),
            ("gemma3", ToolSyntax::Generic),
        ];
        for (family, syntax) in cases {
            let cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(family).join("tokenizer_config.json")).expect("tokenizer config"),
            )
            .expect("json");
            let template = cfg["chat_template"].as_str().expect("template");
            assert_eq!(ToolSyntax::detect(template), syntax, "{family}");
        }
        let phi =
            std::fs::read_to_string(dir.join("chat_templates/microsoft-Phi-3.5-mini-instruct.jinja")).expect("phi");
        assert_eq!(ToolSyntax::detect(&phi), ToolSyntax::Generic);
        let gemma4 = std::fs::read_to_string("tests/data/gemma4/chat_template.jinja").expect("gemma 4");
        assert_eq!(ToolSyntax::detect(&gemma4), ToolSyntax::Gemma4);
        assert!(crate::text::reasoning::ThinkTags::detect(&gemma4).is_some_and(|t| t.close == "<channel|>"));
        assert_eq!(ToolSyntax::Mistral.new_call_id().len(), 9);
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let tool = serde_json::json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
        let set = |tools: Vec<Value>, choice| ToolSet {
            tools,
            choice,
            parallel: true,
        };
        assert_eq!(set(vec![tool.clone()], ToolChoice::Auto).check(), Ok(()));
        let err = |s: ToolSet| s.check().expect_err("refused").0;
        assert_eq!(err(set(vec![], ToolChoice::Required)), "tool_choice");
        assert_eq!(
            err(set(vec![tool.clone()], ToolChoice::Function("g".into()))),
            "tool_choice"
        );
        assert_eq!(
            err(set(vec![serde_json::json!({"type": "code"})], ToolChoice::Auto)),
            "tools[0].type"
        );
        assert_eq!(
            err(set(
                vec![serde_json::json!({"type": "function", "function": {"name": ""}})],
                ToolChoice::Auto
            )),
            "tools[0].function.name"
        );
    }
}
