//! `GenerationSpec`: one generation request as every API describes it after applying its own
//! defaults, before anything is checked. The APIs build it; only `validate` reads it.

use super::SamplingParams;
use crate::text::{ChatPrompt, OutputConstraint};

/// What to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// A conversation (with its tools and template variables), rendered with the model's chat
    /// template; the reply is read for thoughts and tool calls.
    Chat(ChatPrompt),
    /// Plain text, tokenized as is (`add_special_tokens`: BOS and the like, when the model
    /// wants them and nothing comes before the text).
    Text {
        /// The text.
        text: String,
        /// Let the tokenizer add its special tokens.
        add_special_tokens: bool,
    },
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// How `max_tokens` relates to the room left in the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxTokens {
    /// Exactly this budget; a prompt plus budget beyond the context is an error (OpenAI).
    Exactly(u32),
    /// At most this budget, cut to the room left in the context (Ollama's `num_predict`).
    AtMost(u32),
    /// Whatever room the context and the KV pool leave.
    Rest,
}

impl MaxTokens {
    /// The same budget as a cap: an exact one becomes `AtMost`, the others stay.
    pub fn as_cap(self) -> Self {
        match self {
            Self::Exactly(n) => Self::AtMost(n),
            other => other,
        }
    }
}

/// An API-neutral generation request, not yet checked.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationSpec {
    /// Token ids that come before `prompt` (Ollama's `context` of an earlier reply).
    pub context: Vec<u32>,
    /// The new input.
    pub prompt: Prompt,
    /// Sampling, with the API's defaults applied.
    pub sampling: SamplingParams,
    /// Generation budget.
    pub max_tokens: MaxTokens,
    /// A smaller context window for this request (Ollama's `num_ctx`); None = the model's.
    pub context_window: Option<usize>,
    /// Strings that end generation; never emitted.
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// What the output must be (structured output), enforced while decoding.
    pub constraint: Option<OutputConstraint>,
    /// What becomes of a prompt that leaves no room in the context for a reply.
    pub overflow: Overflow,
}

/// What becomes of a prompt that leaves no room in the context for a reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// It is refused (`RequestError::ContextLength`), OpenAI's rule.
    #[default]
    Refuse,
    /// Tokens are cut out of its middle, after its first few, until a reply fits (Ollama's
    /// runner truncates a prompt the same way, logging it).
    CutMiddle,
}

impl GenerationSpec {
    /// A spec for `prompt` with neutral defaults: sampling at temperature 1, no stops, the
    /// rest of the context as budget.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            context: Vec::new(),
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: MaxTokens::Rest,
            context_window: None,
            stop: Vec::new(),
            ignore_eos: false,
            constraint: None,
            overflow: Overflow::Refuse,
        }
    }
}

/// A request field, named neutrally; each API maps it to its own wire name in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The conversation.
    Messages,
    /// The text or token prompt.
    Prompt,
    /// Token ids before the prompt.
    Context,
    /// Sampling temperature.
    Temperature,
    /// Nucleus mass.
    TopP,
    /// Minimum relative probability.
    MinP,
    /// Multiplicative repetition penalty.
    RepetitionPenalty,
    /// Additive presence penalty.
    PresencePenalty,
    /// Additive frequency penalty.
    FrequencyPenalty,
    /// Alternatives reported per token.
    Logprobs,
    /// Per-token logit offsets.
    LogitBias,
    /// Stop strings.
    Stop,
    /// Generation budget.
    MaxTokens,
    /// Per-request context window.
    ContextWindow,
    /// The output's required structure.
    ResponseFormat,
    /// Tools offered to the model.
    Tools,
    /// What the model may do with them.
    ToolChoice,
    /// An embedding request's input.
    Input,
}

impl Field {
    /// The field's name in the OpenAI API.
    pub fn openai_name(self) -> &'static str {
        match self {
            Field::Messages => "messages",
            Field::Prompt => "prompt",
            Field::Context => "prompt",
            Field::Temperature => "temperature",
            Field::TopP => "top_p",
            Field::MinP => "min_p",
            Field::RepetitionPenalty => "repetition_penalty",
            Field::PresencePenalty => "presence_penalty",
            Field::FrequencyPenalty => "frequency_penalty",
            Field::Logprobs => "top_logprobs",
            Field::LogitBias => "logit_bias",
            Field::Stop => "stop",
            Field::MaxTokens => "max_tokens",
            Field::ContextWindow => "max_tokens",
            Field::ResponseFormat => "response_format",
            Field::Tools => "tools",
            Field::ToolChoice => "tool_choice",
            Field::Input => "input",
        }
    }

    /// The field's name in the Ollama API.
    pub fn ollama_name(self) -> &'static str {
        match self {
            Field::Messages => "messages",
            Field::Prompt => "prompt",
            Field::Context => "context",
            Field::Temperature => "options.temperature",
            Field::TopP => "options.top_p",
            Field::MinP => "options.min_p",
            Field::RepetitionPenalty => "options.repeat_penalty",
            Field::PresencePenalty => "options.presence_penalty",
            Field::FrequencyPenalty => "options.frequency_penalty",
            Field::Logprobs => "top_logprobs",
            Field::LogitBias => "logit_bias",
            Field::Stop => "options.stop",
            Field::MaxTokens => "options.num_predict",
            Field::ContextWindow => "options.num_ctx",
            Field::ResponseFormat => "format",
            Field::Tools => "tools",
            Field::ToolChoice => "tools",
            Field::Input => "input",
        }
    }
}
