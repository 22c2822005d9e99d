//! The served model's tokenizer, chat template and special tokens, loaded from its folder.

use std::path::Path;

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::chat_template::{ChatMessage, ChatPrompt, ChatTemplate, TemplateError};
use super::grammar::{GrammarCompiler, OutputConstraint};
use super::reasoning::ThinkTags;
use super::reply::ReplyPlan;
use super::tools::{describe_tools_in_messages, forced_call_grammar, ToolChoice, ToolSet, ToolSyntax};
use crate::formats::{read_text, token_ids, LoadError};

/// Encoding, decoding and chat rendering for one model.
#[derive(Debug)]
pub struct TextCodec {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    bos_id: Option<u32>,
    add_bos_token: bool,
    eos_ids: Vec<u32>,
    grammar: GrammarCompiler,
    /// Added tokens by their text, with whether each is special (the detokenizer hides those).
    added: std::collections::HashMap<String, (u32, bool)>,
}

impl TextCodec {
    /// Loads `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` from `dir`; `config_eos` are config.json's EOS ids.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self, LoadError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(LoadError::Missing {
                path: tok_path,
                what: "tokenizer".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| LoadError::Malformed {
            file: tok_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let tok_cfg = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let gen_cfg = read_optional_json(&dir.join("generation_config.json"))?;
        let token_str = |key: &str| -> Option<String> {
            match tok_cfg.get(key)? {
                Json::String(s) => Some(s.clone()),
                obj => obj.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut eos_ids = token_ids(gen_cfg.get("eos_token_id"));
        for id in config_eos
            .iter()
            .copied()
            .chain(eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)))
        {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let template = load_template(dir, &tok_cfg, bos_token.as_deref(), eos_token.as_deref())?;
        let tokenizer_json = std::fs::read_to_string(&tok_path).map_err(|source| LoadError::Io {
            path: tok_path.clone(),
            source,
        })?;
        Ok(Self {
            added: added_tokens(&tokenizer),
            tokenizer,
            template,
            bos_id,
            add_bos_token: tok_cfg.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false),
            grammar: GrammarCompiler::new(tokenizer_json, eos_ids.clone()),
            eos_ids,
        })
    }

    /// The text side of a model path: a Hugging Face folder or a `.gguf` file.
    pub fn open(path: &Path, config_eos: &[u32]) -> Result<Self, LoadError> {
        if crate::formats::is_gguf(path) {
            Self::from_gguf(path)
        } else {
            Self::load(path, config_eos)
        }
    }

    /// Tokenizer, chat template and special tokens from a GGUF file's metadata.
    pub fn from_gguf(path: &Path) -> Result<Self, LoadError> {
        use super::gguf_tokenizer::{meta_u32, tokenizer_json};
        let malformed = |reason: String| LoadError::Malformed {
            file: path.display().to_string(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = crate::formats::gguf_header::GgufHeader::read(&mut file)
            .map_err(|e| malformed(format!("not a valid GGUF file ({e})")))?;
        let meta = &content.metadata;
        let doc = tokenizer_json(meta).map_err(|e| malformed(format!("tokenizer: {e}")))?;
        let tokenizer: Tokenizer = doc
            .to_string()
            .parse()
            .map_err(|e| malformed(format!("tokenizer: {e}")))?;
        let token = |key: &str| meta_u32(meta, key).and_then(|id| Some((id, tokenizer.id_to_token(id)?)));
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        let eos_ids = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| meta_u32(meta, k))
        .fold(Vec::new(), |mut ids, id| {
            if !ids.contains(&id) {
                ids.push(id);
            }
            ids
        });
        let template = meta
            .get("tokenizer.chat_template")
            .and_then(|t| t.to_string().ok())
            .map(|source| {
                let name = |t: &Option<(u32, String)>| t.as_ref().map_or(String::new(), |(_, s)| s.clone());
                ChatTemplate::new(source, &name(&bos), &name(&eos)).map_err(|e| malformed(e.0))
            })
            .transpose()?;
        Ok(Self {
            added: added_tokens(&tokenizer),
            tokenizer,
            template,
            bos_id: bos.map(|(id, _)| id),
            // The post-processor already adds BOS when the file asks for it.
            add_bos_token: false,
            grammar: GrammarCompiler::new(doc.to_string(), eos_ids.clone()),
            eos_ids,
        })
    }

    /// Compiles output constraints against this tokenizer.
    pub fn grammar(&self) -> &GrammarCompiler {
        &self.grammar
    }

    /// The underlying tokenizer (for detokenizers).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Every id that ends generation by default.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The chat template, when the model folder provides one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The chat template's source, when the model folder provides one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template.as_ref().map(ChatTemplate::source)
    }

    /// The BOS id, when the tokenizer config names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Tokenizes plain text; with `add_special`, BOS and the like are added as the model wants.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TemplateError> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| TemplateError(format!("tokenization failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos_token {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Renders the chat template and tokenizes the result without adding special tokens
    /// (templates emit BOS themselves, as transformers' `apply_chat_template` assumes).
    pub fn encode_chat(&self, chat: &ChatPrompt) -> Result<Vec<u32>, TemplateError> {
        let text = self.render_chat(chat)?;
        self.encode(&text, false)
    }

    /// Renders the chat template with the generation prompt: the messages, the tools (in the
    /// template's `tools` variable, or described in the system message when the template has
    /// no tool support) and the request's extra template variables.
    pub fn render_chat(&self, chat: &ChatPrompt) -> Result<String, TemplateError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TemplateError("this model has no chat template; use /v1/completions".into()))?;
        let mut vars = chat.template_kwargs.clone();
        if !chat.tools.active() {
            return template.render_with(&chat.messages, true, &Json::Object(vars));
        }
        match self.tool_syntax() {
            ToolSyntax::Generic => {
                let messages = describe_tools_in_messages(&chat.messages, &chat.tools.tools);
                template.render_with(&messages, true, &Json::Object(vars))
            }
            ToolSyntax::Phi4 if reads_tools_from_messages(template.source()) => {
                let messages = tools_on_system_turn(&chat.messages, &chat.tools.tools);
                template.render_with(&messages, true, &Json::Object(vars))
            }
            ToolSyntax::Harmony => {
                // gpt-oss's template writes every function's description unconditionally; a
                // description is optional in every API (harmony's own renderer writes none).
                let tools = chat.tools.tools.iter().cloned().map(with_description).collect();
                vars.insert("tools".into(), Json::Array(tools));
                template.render_with(&chat.messages, true, &Json::Object(vars))
            }
            _ => {
                vars.insert("tools".into(), Json::Array(chat.tools.tools.clone()));
                template.render_with(&chat.messages, true, &Json::Object(vars))
            }
        }
    }

    /// The syntax this model writes tool calls in (from its chat template).
    pub fn tool_syntax(&self) -> ToolSyntax {
        ToolSyntax::detect(self.chat_template_source().unwrap_or_default())
    }

    /// How the reply to `chat`, rendered as `rendered`, is read: thoughts when the template
    /// uses think tags, tool calls when the request offers tools.
    pub fn reply_plan(&self, chat: &ChatPrompt, rendered: &str) -> ReplyPlan {
        let thoughts = ThinkTags::detect(self.chat_template_source().unwrap_or_default())
            .map(|tags| (tags.clone(), tags.prompt_opens_thought(rendered)));
        let syntax = self.tool_syntax();
        let tools = chat.tools.active().then_some((syntax, !chat.tools.parallel));
        let harmony = syntax == ToolSyntax::Harmony;
        let mut markers: Vec<&str> = thoughts.iter().flat_map(|(t, _)| t.tokens).collect();
        if tools.is_some() || harmony {
            markers.extend(syntax.special_markers());
        }
        let shown_specials = markers
            .into_iter()
            .filter_map(|m| match self.added.get(m)? {
                (id, true) => Some((*id, m.to_string())),
                _ => None,
            })
            .collect();
        ReplyPlan {
            thoughts,
            reasoning: chat.reasoning,
            tools,
            harmony,
            shown_specials,
        }
    }

    /// The constraint that forces a call when the request requires one (`tool_choice`
    /// `required` or a named function), in this model's syntax.
    pub fn forced_call(&self, tools: &ToolSet) -> Option<OutputConstraint> {
        if !tools.active() || tools.choice == ToolChoice::Auto {
            return None;
        }
        // Markers that are added tokens are named by id: llguidance's trie holds every added
        // token as a special one, so text alone would never match them.
        let grammar = forced_call_grammar(self.tool_syntax(), tools, |m| self.added.get(m).map(|(id, _)| *id));
        Some(OutputConstraint::Grammar(grammar))
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The vocabulary entry of `id` as written in text (special tokens included), e.g.
    /// `<start_of_image>`; None for an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// `tool` (`{"type": "function", "function": {…}}`) with an empty description where it has none.
fn with_description(mut tool: Json) -> Json {
    if let Some(Json::Object(function)) = tool.get_mut("function") {
        function
            .entry("description")
            .or_insert_with(|| Json::String(String::new()));
    }
    tool
}

/// Whether a template takes the tool list from a message (`message['tools']`, Phi-4-mini)
/// rather than from the `tools` variable.
fn reads_tools_from_messages(source: &str) -> bool {
    source.contains("message['tools']") || source.contains("message.tools")
}

/// `messages` with the function list as JSON text on the system turn (one is added first when
/// there is none), as Phi-4-mini's template reads it.
fn tools_on_system_turn(messages: &[ChatMessage], tools: &[Json]) -> Vec<ChatMessage> {
    let functions: Vec<&Json> = tools.iter().map(|t| t.get("function").unwrap_or(t)).collect();
    let listing = Json::from(functions.into_iter().cloned().collect::<Vec<_>>()).to_string();
    let mut out = messages.to_vec();
    match out.first_mut() {
        Some(first) if first.role == "system" => first.tools = Some(listing),
        _ => {
            let mut system = ChatMessage::new("system", "");
            system.tools = Some(listing);
            out.insert(0, system);
        }
    }
    out
}

/// The added tokens of `tokenizer` by text: id and whether it is special.
fn added_tokens(tokenizer: &Tokenizer) -> std::collections::HashMap<String, (u32, bool)> {
    tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, t)| (t.content, (id, t.special)))
        .collect()
}

fn read_optional_json(path: &Path) -> Result<Json, LoadError> {
    if !path.exists() {
        return Ok(Json::Null);
    }
    let text = read_text(path, "json")?;
    serde_json::from_str(&text).map_err(|e| LoadError::Malformed {
        file: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// `chat_template.jinja` wins over `tokenizer_config.json`'s `chat_template` (as in
/// transformers); a list of named templates uses the one named `default`.
fn load_template(
    dir: &Path,
    tok_cfg: &Json,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<Option<ChatTemplate>, LoadError> {
    let file = dir.join("chat_template.jinja");
    let (source, origin) = if file.exists() {
        (Some(read_text(&file, "chat template")?), file.display().to_string())
    } else {
        let origin = dir.join("tokenizer_config.json").display().to_string();
        let source = match tok_cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        (source, origin)
    };
    source
        .map(|s| {
            ChatTemplate::new(&s, bos.unwrap_or_default(), eos.unwrap_or_default()).map_err(|e| LoadError::Malformed {
                file: origin.clone(),
                reason: e.0,
            })
        })
        .transpose()
}
