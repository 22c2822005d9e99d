//! OpenAI's harmony format (gpt-oss): a reply is a run of messages, each a header
//! `[<|start|>assistant][ to=RECIPIENT]<|channel|>CHANNEL[ to=RECIPIENT][ [<|constrain|>]json]`,
//! `<|message|>`, then its body up to `<|end|>`, `<|call|>` or `<|return|>` (or the end of
//! generation). The `analysis` channel is the model's thought, `final` the answer; a message
//! to `functions.NAME` is a call of NAME with its body as the JSON arguments; commentary to no
//! one (a preamble) is answer text. Read as llama.cpp's gpt-oss parser reads it.

use super::{ReasoningMode, ReplyDelta};
use crate::text::reasoning::partial_suffix;
use crate::text::tools::{ToolCall, ToolSyntax};

/// Opens a message's body.
const MESSAGE: &str = "<|message|>";
/// Names a message's channel.
const CHANNEL: &str = "<|channel|>";
/// What ends a message's body (`<|start|>`: a model that skipped `<|end|>`).
const BODY_ENDS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"];

/// What a message's body is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    Thought,
    Answer,
    /// A call of this function; the body is gathered whole.
    Call(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Reading a header, up to `<|message|>`.
    Header,
    Body(Body),
}

/// Sorts a streamed harmony reply into thought, answer and calls.
#[derive(Clone, Debug)]
pub struct HarmonyParser {
    state: State,
    held: String,
    reasoning: ReasoningMode,
    /// Messages to `functions.*` are calls (the request offers tools).
    calls: bool,
    /// The reply holds at most one call.
    single: bool,
    done: bool,
}

impl HarmonyParser {
    /// A parser for a reply whose thoughts go where `reasoning` says; with `calls`, messages to
    /// functions are tool calls (at most one when `single`).
    pub fn new(reasoning: ReasoningMode, calls: bool, single: bool) -> Self {
        Self {
            state: State::Header,
            held: String::new(),
            reasoning,
            calls,
            single,
            done: false,
        }
    }

    /// Feeds newly generated text; returns what is certain now.
    pub fn push(&mut self, text: &str) -> ReplyDelta {
        let mut out = ReplyDelta::default();
        if self.done {
            return out;
        }
        self.held.push_str(text);
        while !self.done && self.step(&mut out) {}
        out.done = self.done;
        out
    }

    /// The end of generation: an unfinished body is what it is (a call's arguments included).
    pub fn finish(&mut self) -> ReplyDelta {
        let mut out = ReplyDelta::default();
        let held = std::mem::take(&mut self.held);
        match std::mem::replace(&mut self.state, State::Header) {
            _ if self.done => {}
            State::Header if !held.contains(CHANNEL) && !held.contains(MESSAGE) => {
                out.content.push_str(held.trim());
            }
            State::Header => {}
            State::Body(body) => self.close(body, &held, &mut out),
        }
        out.done = self.done;
        out
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, out: &mut ReplyDelta) -> bool {
        match self.state.clone() {
            State::Header => {
                let trimmed = self.held.trim_start();
                if !trimmed.is_empty() && !trimmed.starts_with('<') && !trimmed.starts_with("to=") {
                    // Plain text where a header belongs: the model answered without one.
                    self.state = State::Body(Body::Answer);
                    return true;
                }
                let Some(at) = self.held.find(MESSAGE) else {
                    return false;
                };
                let header = self.held[..at].to_string();
                self.held.drain(..at + MESSAGE.len());
                let body = self.body_of(&header);
                if body == Body::Thought && self.reasoning == ReasoningMode::Inline {
                    out.content.push_str(&format!("{CHANNEL}analysis{MESSAGE}"));
                }
                self.state = State::Body(body);
                true
            }
            State::Body(body) => {
                let end = BODY_ENDS
                    .iter()
                    .filter_map(|e| self.held.find(e).map(|at| (at, *e)))
                    .min();
                match end {
                    Some((at, end)) => {
                        let text = self.held[..at].to_string();
                        let skip = if end == "<|start|>" { at } else { at + end.len() };
                        self.held.drain(..skip);
                        self.state = State::Header;
                        self.close(body, &text, out);
                        true
                    }
                    None => {
                        if !matches!(body, Body::Call(_)) {
                            let keep = BODY_ENDS
                                .iter()
                                .map(|e| partial_suffix(&self.held, e))
                                .max()
                                .unwrap_or(0);
                            let ready = self.held.len() - keep;
                            let text: String = self.held.drain(..ready).collect();
                            self.emit(&body, &text, out);
                        }
                        false
                    }
                }
            }
        }
    }

    /// The kind of body a header announces.
    fn body_of(&self, header: &str) -> Body {
        let recipient = header.split("to=").nth(1).map(|r| {
            r.split(|c: char| c.is_whitespace() || c == '<')
                .next()
                .unwrap_or_default()
        });
        if let Some(name) = recipient.and_then(|r| r.strip_prefix("functions.")) {
            if self.calls && !name.is_empty() {
                return Body::Call(name.to_string());
            }
        }
        let channel = header
            .split(CHANNEL)
            .nth(1)
            .and_then(|c| c.split(|c: char| c.is_whitespace() || c == '<').next())
            .unwrap_or_default();
        if channel == "analysis" {
            Body::Thought
        } else {
            Body::Answer
        }
    }

    /// Text of a body in progress.
    fn emit(&self, body: &Body, text: &str, out: &mut ReplyDelta) {
        match (body, self.reasoning) {
            (Body::Thought, ReasoningMode::Separate) => out.reasoning.push_str(text),
            (Body::Thought, ReasoningMode::Inline) | (Body::Answer, _) => out.content.push_str(text),
            (Body::Thought, ReasoningMode::Drop) | (Body::Call(_), _) => {}
        }
    }

    /// The last text of a body, and what its end completes: a thought's closing tag inline, a
    /// call (its arguments a JSON object; anything else is shown as text).
    fn close(&mut self, body: Body, text: &str, out: &mut ReplyDelta) {
        match body {
            Body::Call(name) => match serde_json::from_str::<serde_json::Value>(text.trim()) {
                Ok(args @ serde_json::Value::Object(_)) => {
                    out.tool_calls.push(ToolCall {
                        id: ToolSyntax::Harmony.new_call_id(),
                        name,
                        arguments: args.to_string(),
                    });
                    self.done = self.single;
                }
                _ => out.content.push_str(text),
            },
            Body::Thought => {
                self.emit(&Body::Thought, text, out);
                if self.reasoning == ReasoningMode::Inline {
                    out.content.push_str("<|end|>");
                }
            }
            Body::Answer => self.emit(&Body::Answer, text, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply fed in pieces of `size` bytes (on char boundaries): reasoning, content, calls.
    fn run(text: &str, size: usize, mode: ReasoningMode, single: bool) -> (String, String, Vec<(String, String)>) {
        let mut p = HarmonyParser::new(mode, true, single);
        let mut deltas = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            deltas.push(p.push(&rest[..cut]));
            rest = &rest[cut..];
        }
        deltas.push(p.finish());
        let mut out = (String::new(), String::new(), Vec::new());
        for d in deltas {
            out.0 += &d.reasoning;
            out.1 += &d.content;
            out.2.extend(d.tool_calls.into_iter().map(|c| (c.name, c.arguments)));
        }
        out
    }

    #[test]
    fn thought_then_answer_in_any_pieces() {
        let text = "<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hello there!";
        for size in [1, 3, 7, 1000] {
            let (r, c, calls) = run(text, size, ReasoningMode::Separate, false);
            assert_eq!(
                (r.as_str(), c.as_str(), calls.len()),
                ("User greets. Reply.", "Hello there!", 0),
                "pieces of {size}"
            );
        }
        assert_eq!(run(text, 5, ReasoningMode::Drop, false).0, "");
        assert_eq!(
            run(text, 5, ReasoningMode::Inline, false).1,
            "<|channel|>analysis<|message|>User greets. Reply.<|end|>Hello there!"
        );
    }

    #[test]
    fn calls_with_the_recipient_after_or_before_the_channel() {
        let after = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>";
        let before =
            "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Paris\"}";
        for text in [after, before] {
            for size in [1, 4, 1000] {
                let (_, c, calls) = run(text, size, ReasoningMode::Separate, true);
                assert_eq!(c, "");
                assert_eq!(
                    calls,
                    vec![("get_weather".to_string(), "{\"city\":\"Paris\"}".to_string())]
                );
            }
        }
    }

    #[test]
    fn preambles_plain_text_and_broken_arguments_are_answer_text() {
        let preamble =
            "<|channel|>commentary<|message|>Checking…<|end|><|start|>assistant<|channel|>final<|message|>Done.";
        assert_eq!(run(preamble, 2, ReasoningMode::Separate, false).1, "Checking…Done.");
        assert_eq!(run("Just text.", 3, ReasoningMode::Separate, false).1, "Just text.");
        let broken = "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{oops<|call|>";
        let (_, c, calls) = run(broken, 3, ReasoningMode::Separate, false);
        assert_eq!((c.as_str(), calls.len()), ("{oops", 0));
    }

    #[test]
    fn without_tools_a_call_is_answer_text_and_one_call_ends_a_single_reply() {
        let call = "<|channel|>commentary to=functions.f<|message|>{}<|call|>";
        let mut p = HarmonyParser::new(ReasoningMode::Separate, false, false);
        let mut d = p.push(call);
        let rest = p.finish();
        d.content += &rest.content;
        assert_eq!((d.content.as_str(), d.tool_calls.len()), ("{}", 0));
        let mut p = HarmonyParser::new(ReasoningMode::Separate, true, true);
        let d = p.push(&format!("{call}<|start|>assistant<|channel|>final<|message|>more"));
        assert!(d.done && d.tool_calls.len() == 1 && d.content.is_empty());
    }
}
