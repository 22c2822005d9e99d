//! Tool calls read out of a streamed reply: text outside call blocks is content (shown at
//! once, except a possible partial marker), each call is emitted whole when its block closes
//! (or the reply ends), and a block that does not parse stays content, as written.

use super::parse::{holds_a_call, parse_calls};
use super::{ToolCall, ToolSyntax};
use crate::text::reasoning::partial_suffix;

/// What one piece of reply text turned into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedDelta {
    /// Text to show as the message's content.
    pub content: String,
    /// Calls completed by this piece.
    pub calls: Vec<ToolCall>,
    /// A reply limited to one call has made it: generation can end here.
    pub done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Only blanks so far (syntaxes whose call must open the reply).
    Start,
    /// Content; a call may open.
    Text,
    /// Content; no call can open any more.
    PlainText,
    /// Inside a call block.
    Call,
    /// One call made and no more allowed: the rest is dropped.
    Done,
}

/// Splits a reply into content and tool calls, in a model family's syntax.
#[derive(Clone, Debug)]
pub struct ToolCallParser {
    syntax: ToolSyntax,
    single: bool,
    state: State,
    held: String,
    /// Blanks before the open call block: dropped with a call, kept with a failed one.
    blanks: String,
    made_calls: bool,
}

impl ToolCallParser {
    /// A parser for `syntax`; with `single` the reply ends after its first call.
    pub fn new(syntax: ToolSyntax, single: bool) -> Self {
        let opens_anywhere = syntax.markers().0 != "{";
        Self {
            syntax,
            single,
            state: if opens_anywhere { State::Text } else { State::Start },
            held: String::new(),
            blanks: String::new(),
            made_calls: false,
        }
    }

    /// Feeds reply text.
    pub fn push(&mut self, text: &str) -> ParsedDelta {
        let mut out = ParsedDelta::default();
        if self.state == State::Done {
            return out;
        }
        self.held.push_str(text);
        while self.step(&mut out) {}
        out.done = self.state == State::Done;
        out
    }

    /// The end of the reply: a call still open is parsed as it stands.
    pub fn finish(&mut self) -> ParsedDelta {
        let mut out = ParsedDelta::default();
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Call => self.close_call(&held, None, &mut out),
            State::Done => {}
            _ if self.made_calls && held.trim().is_empty() => {}
            _ => out.content = held,
        }
        out
    }

    /// One transition; false when the held text needs more input.
    fn step(&mut self, out: &mut ParsedDelta) -> bool {
        let (open, close) = self.syntax.markers();
        match self.state {
            State::Start => {
                let trimmed = self.held.trim_start();
                let openers = ["{", "<|python_tag|>"];
                if openers.iter().any(|o| trimmed.starts_with(o)) {
                    self.held = trimmed.to_string();
                    self.state = State::Call;
                    return true;
                }
                if trimmed.is_empty() || openers.iter().any(|o| o.starts_with(trimmed)) {
                    return false;
                }
                out.content.push_str(&std::mem::take(&mut self.held));
                self.state = State::PlainText;
                false
            }
            State::Text => {
                // Blanks are held too: those right before a call are dropped with it.
                if let Some(pos) = self.held.find(open) {
                    let kept = self.held[..pos].trim_end().len();
                    out.content.push_str(&self.held[..kept]);
                    self.blanks = self.held[kept..pos].to_string();
                    self.held.drain(..pos + open.len());
                    self.state = State::Call;
                    return true;
                }
                let unsure = self.held.len() - partial_suffix(&self.held, open);
                let emit = self.held[..unsure].trim_end().len();
                out.content.push_str(&self.held[..emit]);
                self.held.drain(..emit);
                false
            }
            State::PlainText => {
                out.content.push_str(&std::mem::take(&mut self.held));
                false
            }
            State::Call => match close.and_then(|c| self.held.find(c).map(|pos| (c, pos))) {
                Some((close, pos)) => {
                    let body = self.held[..pos].to_string();
                    self.held.drain(..pos + close.len());
                    self.close_call(&body, Some(close), out);
                    if self.state != State::Done {
                        self.state = State::Text;
                    }
                    true
                }
                None => {
                    if self.single && close.is_none() && holds_a_call(&self.held) {
                        let body = std::mem::take(&mut self.held);
                        self.close_call(&body, None, out);
                    }
                    false
                }
            },
            State::Done => false,
        }
    }

    /// Emits the calls of `body`, or the block as written when it holds none.
    fn close_call(&mut self, body: &str, close: Option<&str>, out: &mut ParsedDelta) {
        let calls = match self.single {
            true => first_call(body).and_then(parse_calls),
            false => parse_calls(body),
        };
        let blanks = std::mem::take(&mut self.blanks);
        let Some(mut calls) = calls else {
            let (open, _) = self.syntax.markers();
            let open = if open == "{" { "" } else { open };
            out.content
                .push_str(&format!("{blanks}{open}{body}{}", close.unwrap_or_default()));
            return;
        };
        self.made_calls = true;
        if self.single {
            calls.truncate(1);
            self.state = State::Done;
            self.held.clear();
        }
        out.calls.extend(calls.into_iter().map(|(name, args)| ToolCall {
            id: self.syntax.new_call_id(),
            name,
            arguments: args.to_string(),
        }));
    }
}

/// The text of the first call in a block that may hold several (a list cut after its first
/// element, or the first of `;`-separated objects).
fn first_call(body: &str) -> Option<&str> {
    let trimmed = body.trim_start();
    let start = body.len() - trimmed.len();
    let json_at = match trimmed.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        true => return Some(trimmed.split("[TOOL_CALLS]").next().unwrap_or(trimmed)),
        false => {
            let tagless = trimmed.strip_prefix("<|python_tag|>").unwrap_or(trimmed).trim_start();
            let listless = tagless.strip_prefix('[').unwrap_or(tagless);
            start + (trimmed.len() - listless.len())
        }
    };
    let mut values = serde_json::Deserializer::from_str(&body[json_at..]).into_iter::<serde_json::Value>();
    values.next()?.ok()?;
    Some(&body[json_at..json_at + values.byte_offset()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` bytes (on char boundaries) and joins the results.
    fn run(syntax: ToolSyntax, single: bool, text: &str, step: usize) -> (String, Vec<(String, String)>, bool) {
        let mut p = ToolCallParser::new(syntax, single);
        let (mut content, mut calls, mut done) = (String::new(), Vec::new(), false);
        let mut absorb = |d: ParsedDelta| {
            content.push_str(&d.content);
            calls.extend(d.calls.into_iter().map(|c| (c.name, c.arguments)));
            done |= d.done;
        };
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(step) {
            absorb(p.push(&piece.iter().collect::<String>()));
        }
        absorb(p.finish());
        (content, calls, done)
    }

    fn every_step(syntax: ToolSyntax, single: bool, text: &str) -> (String, Vec<(String, String)>, bool) {
        let whole = run(syntax, single, text, text.len().max(1));
        for step in 1..8 {
            assert_eq!(run(syntax, single, text, step), whole, "{syntax:?} in pieces of {step}");
        }
        whole
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.into(), args.into())
    }

    #[test]
    fn hermes_calls_and_the_text_around_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls, done) = every_step(ToolSyntax::Hermes, false, text);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![call("get_weather", "{\"city\":\"Paris\"}"), call("get_time", "{}")]
        );
        assert!(!done);
        let (_, calls, done) = every_step(ToolSyntax::Hermes, true, text);
        assert_eq!((calls.len(), done), (1, true));
    }

    #[test]
    fn a_block_that_is_not_a_call_stays_text() {
        let text = "a <tool_call>not json</tool_call> b <tool_";
        let (content, calls, _) = every_step(ToolSyntax::Hermes, false, text);
        assert_eq!((content.as_str(), calls.len()), (text, 0));
    }

    #[test]
    fn llama3_and_generic_replies_that_are_calls() {
        let text = " <|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}";
        assert_eq!(
            every_step(ToolSyntax::Llama3, false, text),
            (String::new(), vec![call("f", "{\"x\":1}")], false)
        );
        let answer = "The answer is {x}.";
        assert_eq!(
            every_step(ToolSyntax::Generic, false, answer),
            (answer.into(), vec![], false)
        );
        let broken = "{\"name\": \"f\", \"arguments\": ";
        assert_eq!(
            every_step(ToolSyntax::Generic, false, broken),
            (broken.into(), vec![], false)
        );
        let two = "{\"name\": \"f\", \"arguments\": {}}; {\"name\": \"g\", \"arguments\": {}}";
        let (_, calls, done) = every_step(ToolSyntax::Generic, true, two);
        assert_eq!((calls, done), (vec![call("f", "{}")], true));
    }

    #[test]
    fn mistral_and_phi4_calls() {
        let text =
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"b\", \"arguments\": {}}]";
        let (content, calls, _) = every_step(ToolSyntax::Mistral, false, text);
        assert_eq!((content.as_str(), calls.len()), ("", 2));
        let (_, calls, done) = every_step(ToolSyntax::Mistral, true, text);
        assert_eq!((calls, done), (vec![call("a", "{\"q\":\"x\"}")], true));
        let phi = "<|tool_call|>[{\"name\": \"a\", \"arguments\": {}}]<|/tool_call|>";
        assert_eq!(every_step(ToolSyntax::Phi4, false, phi).1, vec![call("a", "{}")]);
    }
}
