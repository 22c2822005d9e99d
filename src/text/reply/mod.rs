//! A chat reply read as what it is: thoughts, answer text and tool calls, in the model
//! family's conventions. `ReplyPlan` is decided once per request (at validation, from the
//! template, the rendered prompt and the request's tools); `ReplyParser` applies it to the
//! streamed text, so streamed and whole replies come out identical.

mod harmony;

use super::reasoning::{ThinkTags, ThoughtSplitter};
use super::tools::{ToolCall, ToolCallParser, ToolSyntax};
use harmony::HarmonyParser;

/// What happens to a thinking model's thoughts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningMode {
    /// In their own field (`reasoning_content`, Ollama's `thinking`), never in the content.
    #[default]
    Separate,
    /// Left in the content, tags included.
    Inline,
    /// Dropped.
    Drop,
}

/// How one request's reply is read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplyPlan {
    /// The model's thought tags, and whether the prompt already opened a thought.
    pub thoughts: Option<(ThinkTags, bool)>,
    /// What happens to thoughts.
    pub reasoning: ReasoningMode,
    /// The syntax tool calls are read in, and whether a reply holds at most one.
    pub tools: Option<(ToolSyntax, bool)>,
    /// The reply is in OpenAI's harmony format (gpt-oss): thoughts, answer and calls are its
    /// channels (`text::harmony`), not tags.
    pub harmony: bool,
    /// Special tokens the parser must see, with their text (the detokenizer hides specials).
    pub shown_specials: Vec<(u32, String)>,
}

/// What a piece of reply text turned into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyDelta {
    /// Answer text.
    pub content: String,
    /// Thought text.
    pub reasoning: String,
    /// Calls completed.
    pub tool_calls: Vec<ToolCall>,
    /// The reply is complete (its one allowed call is made): generation can end.
    pub done: bool,
}

/// Applies a `ReplyPlan` to streamed text.
#[derive(Clone, Debug)]
pub struct ReplyParser {
    thoughts: Option<ThoughtSplitter>,
    drop_thoughts: bool,
    /// Inline thoughts opened by the prompt: the open tag, shown before the first content.
    inline_open: Option<String>,
    tools: Option<ToolCallParser>,
    harmony: Option<HarmonyParser>,
}

impl ReplyParser {
    /// A parser for `plan`.
    pub fn new(plan: &ReplyPlan) -> Self {
        if plan.harmony {
            let (calls, single) = plan.tools.map_or((false, false), |(_, single)| (true, single));
            return Self {
                thoughts: None,
                drop_thoughts: false,
                inline_open: None,
                tools: None,
                harmony: Some(HarmonyParser::new(plan.reasoning, calls, single)),
            };
        }
        let (thoughts, inline_open) = match (&plan.thoughts, plan.reasoning) {
            (Some((tags, in_thought)), ReasoningMode::Inline) => (None, in_thought.then(|| tags.open.clone())),
            (Some((tags, in_thought)), _) => (Some(ThoughtSplitter::new(tags.clone(), *in_thought)), None),
            (None, _) => (None, None),
        };
        Self {
            thoughts,
            drop_thoughts: plan.reasoning == ReasoningMode::Drop,
            inline_open,
            tools: plan.tools.map(|(syntax, single)| ToolCallParser::new(syntax, single)),
            harmony: None,
        }
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> ReplyDelta {
        if let Some(harmony) = &mut self.harmony {
            return harmony.push(text);
        }
        let (reasoning, content) = match &mut self.thoughts {
            Some(splitter) => {
                let split = splitter.push(text);
                (split.reasoning, split.content)
            }
            None => (String::new(), text.to_string()),
        };
        let mut delta = self.answer(content, false);
        delta.reasoning = if self.drop_thoughts { String::new() } else { reasoning };
        delta
    }

    /// The end of generation: whatever was held back.
    pub fn finish(&mut self) -> ReplyDelta {
        if let Some(harmony) = &mut self.harmony {
            return harmony.finish();
        }
        let (reasoning, content) = match &mut self.thoughts {
            Some(splitter) => {
                let split = splitter.finish();
                (split.reasoning, split.content)
            }
            None => Default::default(),
        };
        let mut delta = self.answer(content, true);
        delta.reasoning = if self.drop_thoughts { String::new() } else { reasoning };
        delta
    }

    /// Answer text through the tool-call parser.
    fn answer(&mut self, mut content: String, last: bool) -> ReplyDelta {
        if !content.is_empty() {
            if let Some(open) = self.inline_open.take() {
                content.insert_str(0, &open);
            }
        }
        let Some(tools) = &mut self.tools else {
            return ReplyDelta {
                content,
                ..Default::default()
            };
        };
        let mut parsed = tools.push(&content);
        if last {
            let rest = tools.finish();
            parsed.content.push_str(&rest.content);
            parsed.calls.extend(rest.calls);
        }
        ReplyDelta {
            content: parsed.content,
            reasoning: String::new(),
            tool_calls: parsed.calls,
            done: parsed.done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(reasoning: ReasoningMode, in_thought: bool) -> ReplyPlan {
        ReplyPlan {
            thoughts: ThinkTags::detect("<think></think>").map(|t| (t, in_thought)),
            reasoning,
            tools: Some((ToolSyntax::Hermes, false)),
            harmony: false,
            shown_specials: Vec::new(),
        }
    }

    fn run(plan: &ReplyPlan, pieces: &[&str]) -> (String, String, usize) {
        let mut p = ReplyParser::new(plan);
        let (mut r, mut c, mut calls) = (String::new(), String::new(), 0);
        let mut deltas: Vec<ReplyDelta> = pieces.iter().map(|t| p.push(t)).collect();
        deltas.push(p.finish());
        for d in deltas {
            r += &d.reasoning;
            c += &d.content;
            calls += d.tool_calls.len();
        }
        (r, c, calls)
    }

    #[test]
    fn a_call_inside_a_thought_is_only_thought() {
        let text = [
            "<think>maybe <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call></think>",
            "ok <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
        ];
        let (r, c, calls) = run(&plan(ReasoningMode::Separate, false), &text);
        assert_eq!(
            (r.as_str(), c.as_str(), calls),
            (
                "maybe <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
                "ok",
                1
            )
        );
    }

    #[test]
    fn modes_keep_drop_or_inline_the_thought() {
        assert_eq!(
            run(&plan(ReasoningMode::Drop, true), &["a</think>b"]),
            (String::new(), "b".into(), 0)
        );
        assert_eq!(
            run(&plan(ReasoningMode::Inline, true), &["a</think>b"]),
            (String::new(), "<think>a</think>b".into(), 0)
        );
    }
}
