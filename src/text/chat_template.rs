//! Hugging Face chat templates rendered with minijinja, configured like transformers'
//! sandboxed Jinja environment (`trim_blocks`, `lstrip_blocks`, loop controls, Python-style
//! string/dict methods, `raise_exception`, `strftime_now`).

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::reply::ReasoningMode;
use super::tools::ToolSet;

/// One chat turn as the template sees it. Optional fields are left out when absent:
/// templates test them with `is defined` and `'tool_calls' in message`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (or whatever roles the template accepts).
    pub role: String,
    /// Plain text content.
    pub content: String,
    /// An assistant turn's earlier thought (templates such as Qwen3's render or drop it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// An assistant turn's calls, OpenAI-shaped, with `function.arguments` as an object (the
    /// form templates expect, as transformers and vLLM pass them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's function name, or a participant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tool list as JSON text, on the system turn of templates that read it there
    /// (Phi-4-mini's) instead of from the `tools` variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
    /// Images of the turn, each where it stands in `content`. A turn with images reaches the
    /// template as content parts (`{"type": "image"}` and `{"type": "text", "text": …}`), as
    /// transformers passes them; the bytes stay out of the template.
    #[serde(skip)]
    pub images: Vec<ChatImage>,
}

/// An image of a chat turn: its encoded bytes (PNG, JPEG, WebP…), undecoded, and the byte
/// offset in the turn's text where it stands.
#[derive(Clone, PartialEq, Eq)]
pub struct ChatImage {
    /// The file's bytes as the client sent them.
    pub bytes: std::sync::Arc<[u8]>,
    /// Where in `ChatMessage::content` it stands (a char boundary; `content.len()` = at the end).
    pub at: usize,
}

impl std::fmt::Debug for ChatImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatImage({} bytes at {})", self.bytes.len(), self.at)
    }
}

impl ChatMessage {
    /// A plain text turn.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
            tools: None,
            images: Vec::new(),
        }
    }

    /// The turn as the template sees it: content parts when it carries images (text between
    /// them, an `{"type": "image"}` part where each stands), its plain fields otherwise.
    fn for_template(&self) -> TemplateTurn<'_> {
        if self.images.is_empty() {
            return TemplateTurn::Plain(self);
        }
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let mut parts = Vec::new();
        let mut from = 0;
        let text_part = |text: &str| serde_json::json!({"type": "text", "text": text});
        for image in &self.images {
            let at = image.at.min(self.content.len());
            if at > from {
                parts.push(text_part(&self.content[from..at]));
            }
            parts.push(serde_json::json!({"type": "image"}));
            from = from.max(at);
        }
        if from < self.content.len() {
            parts.push(text_part(&self.content[from..]));
        }
        value["content"] = serde_json::Value::Array(parts);
        TemplateTurn::Parts(value)
    }
}

/// A turn handed to the template: as it is, or rewritten with content parts.
#[derive(Serialize)]
#[serde(untagged)]
enum TemplateTurn<'a> {
    Plain(&'a ChatMessage),
    Parts(serde_json::Value),
}

/// A conversation to render, with what the template may be given besides the messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatPrompt {
    /// The turns.
    pub messages: Vec<ChatMessage>,
    /// Tools offered to the model, and what it may do with them.
    pub tools: ToolSet,
    /// Extra template variables (`chat_template_kwargs`: `enable_thinking`, `reasoning_effort`…).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// What happens to the model's thoughts.
    pub reasoning: ReasoningMode,
}

impl ChatPrompt {
    /// A conversation with no tools and no extra variables.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }
}

/// A template that could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special-token strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_test("iterable", is_iterable);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))
            .map_err(|e| TemplateError(format!("chat template does not compile: {e}")))?;
        let template = Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        template.check_renders_a_simple_conversation()?;
        Ok(template)
    }

    /// A template that cannot render user → assistant → user cannot serve chat: say so at load
    /// rather than on every request.
    fn check_renders_a_simple_conversation(&self) -> Result<(), TemplateError> {
        let conversation = [("user", "Hello!"), ("assistant", "Hi!"), ("user", "How are you?")]
            .map(|(role, content)| ChatMessage::new(role, content));
        self.render(&conversation, true).map(|_| ()).map_err(|e| {
            TemplateError(format!(
                "chat template cannot render a simple user/assistant conversation: {}",
                e.0
            ))
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, ending with the assistant prefix when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with(messages, add_generation_prompt, &serde_json::Value::Null)
    }

    /// Like `render`, with extra template variables (an object, e.g. `{"date_string": …}` or
    /// `{"enable_thinking": false}`) as transformers' `apply_chat_template(**kwargs)`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError(e.to_string()))?;
        // transformers passes `tools` and `documents` as None when absent; extra wins.
        let mut vars = serde_json::Map::new();
        vars.insert("tools".into(), serde_json::Value::Null);
        vars.insert("documents".into(), serde_json::Value::Null);
        if let serde_json::Value::Object(extra) = extra {
            vars.extend(extra.clone());
        }
        let messages: Vec<TemplateTurn> = messages.iter().map(ChatMessage::for_template).collect();
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            ..Value::from(minijinja::value::Serde(vars))
        };
        // A template is code from the model folder run on client input: a panic inside the
        // template engine (minijinja 3.0.5 panicked on `messages[::-1]` of an empty list) fails
        // this render, not the caller.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render(ctx)))
            .map_err(|_| TemplateError("the chat template crashed while rendering this conversation".into()))?;
        rendered.map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => TemplateError(e.detail().unwrap_or("invalid operation").to_string()),
            _ => TemplateError(e.to_string()),
        })
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` only marks assistant text for training
/// masks; it renders its body. minijinja has no custom tags, so it becomes `{% if true %}`
/// (whitespace-control dashes kept).
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_matches('-').trim();
        out.push_str(&rest[..start]);
        let (open_dash, close_dash) = (tag.starts_with("{%-"), tag.ends_with("-%}"));
        let replacement = match inner {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(stmt) => out.push_str(&format!(
                "{{%{} {stmt} {}%}}",
                if open_dash { "-" } else { "" },
                if close_dash { "-" } else { "" }
            )),
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `iterable` test: `None` (and undefined) are not iterable, unlike minijinja's
/// built-in, which templates rely on in `tools is iterable and tools | length > 0`.
fn is_iterable(value: Value) -> bool {
    !value.is_none() && !value.is_undefined() && value.try_iter().is_ok()
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, Error> {
    let now = jiff::Zoned::now();
    jiff::fmt::strtime::format(format.as_bytes(), &now)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn renders_with_trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n  {{ m.role }}: {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        let out = t.render(&[msg("user", " hi ")], true).expect("renders");
        assert_eq!(out, "  user: hi\nA:");
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let src = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('Unsupported role: ' + m.role) }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let err = t.render(&[msg("tool", "x")], false).expect_err("raises");
        assert_eq!(err.0, "Unsupported role: tool");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{%- for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        assert_eq!(
            t.render(&[msg("user", "a"), msg("assistant", "b")], false)
                .expect("renders"),
            "[a][b]"
        );
    }

    #[test]
    fn a_template_that_cannot_render_a_conversation_fails_at_load() {
        let err = ChatTemplate::new("{{ 'x' + functions }}", "", "").expect_err("undefined variable");
        assert!(
            err.0.contains("cannot render a simple user/assistant conversation"),
            "{}",
            err.0
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}", "", "").expect("compiles");
        assert_eq!(t.render(&[msg("user", "  ab ")], false).expect("renders"), "AB");
    }
}
