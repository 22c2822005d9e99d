//! Thoughts split from the answer, for models that think between tags (Qwen3's
//! `<think>…</think>`, DeepSeek-R1 and their descendants; Gemma 4's thought channel
//! `<|channel>thought…<channel|>`): a streaming state machine over the generated text, so a tag
//! cut across chunks is still found and never shown.

/// The tags a model's thoughts are enclosed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinkTags {
    /// Opens a thought (`<think>`).
    pub open: String,
    /// Closes it (`</think>`).
    pub close: String,
    /// The tokens the tags are made of, which the detokenizer must show where they are
    /// special tokens (`<|channel>` of Gemma 4's `<|channel>thought`).
    pub tokens: [&'static str; 2],
}

impl ThinkTags {
    /// The tags the chat template uses: the `<think>` / `</think>` pair that Qwen3, QwQ,
    /// DeepSeek-R1 and most thinking models share, or Gemma 4's thought channel.
    pub fn detect(template_source: &str) -> Option<Self> {
        if template_source.contains("<|channel>") {
            return Some(Self {
                open: "<|channel>thought".into(),
                close: "<channel|>".into(),
                tokens: ["<|channel>", "<channel|>"],
            });
        }
        let (open, close) = ("<think>", "</think>");
        (template_source.contains(open) || template_source.contains(close)).then(|| Self {
            open: open.into(),
            close: close.into(),
            tokens: [open, close],
        })
    }

    /// Whether a rendered prompt leaves the model inside an open thought (templates that
    /// start the reply with `<think>\n`, as DeepSeek-R1's and Qwen3-Thinking's do).
    pub fn prompt_opens_thought(&self, prompt: &str) -> bool {
        let prompt = prompt.trim_end();
        prompt.ends_with(&self.open)
    }
}

/// A piece of the reply, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThoughtSplit {
    /// Text of the thought (tags removed).
    pub reasoning: String,
    /// Text of the answer.
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing but blanks yet: a thought may still open.
    Start,
    /// Inside the thought, before its first non-blank character.
    ThoughtStart,
    Thought,
    /// The thought closed; blanks before the answer are dropped.
    AnswerStart,
    Answer,
}

/// Sorts generated text into thought and answer.
#[derive(Clone, Debug)]
pub struct ThoughtSplitter {
    tags: ThinkTags,
    state: State,
    held: String,
}

impl ThoughtSplitter {
    /// A splitter for `tags`; `in_thought` when the prompt already opened the thought.
    pub fn new(tags: ThinkTags, in_thought: bool) -> Self {
        Self {
            tags,
            state: if in_thought { State::ThoughtStart } else { State::Start },
            held: String::new(),
        }
    }

    /// Feeds newly generated text; returns what is certain now.
    pub fn push(&mut self, text: &str) -> ThoughtSplit {
        self.held.push_str(text);
        let mut out = ThoughtSplit::default();
        loop {
            let progressed = match self.state {
                State::Start => self.at_start(&mut out),
                State::ThoughtStart => self.skip_blanks(State::Thought),
                State::Thought => self.in_thought(&mut out),
                State::AnswerStart => self.skip_blanks(State::Answer),
                State::Answer => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    false
                }
            };
            if !progressed {
                return out;
            }
        }
    }

    /// The end of generation: text held back for a partial tag is what it is.
    pub fn finish(&mut self) -> ThoughtSplit {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Thought | State::ThoughtStart => ThoughtSplit {
                reasoning: held.trim_start().to_string(),
                content: String::new(),
            },
            State::AnswerStart => ThoughtSplit::default(),
            State::Start | State::Answer => ThoughtSplit {
                reasoning: String::new(),
                content: held,
            },
        }
    }

    /// Before anything but blanks: the open tag starts a thought, anything else is the answer.
    fn at_start(&mut self, out: &mut ThoughtSplit) -> bool {
        let trimmed = self.held.trim_start();
        if let Some(rest) = trimmed.strip_prefix(self.tags.open.as_str()) {
            self.held = rest.to_string();
            self.state = State::ThoughtStart;
            return true;
        }
        if trimmed.is_empty() || self.tags.open.starts_with(trimmed) {
            return false;
        }
        out.content.push_str(&std::mem::take(&mut self.held));
        self.state = State::Answer;
        false
    }

    fn skip_blanks(&mut self, next: State) -> bool {
        let trimmed = self.held.trim_start();
        if trimmed.is_empty() {
            self.held.clear();
            return false;
        }
        self.held = trimmed.to_string();
        self.state = next;
        true
    }

    fn in_thought(&mut self, out: &mut ThoughtSplit) -> bool {
        if let Some(pos) = self.held.find(self.tags.close.as_str()) {
            out.reasoning.push_str(&self.held[..pos]);
            self.held = self.held[pos + self.tags.close.len()..].to_string();
            self.state = State::AnswerStart;
            return true;
        }
        let keep = partial_suffix(&self.held, &self.tags.close);
        let emit = self.held.len() - keep;
        out.reasoning.push_str(&self.held[..emit]);
        self.held.drain(..emit);
        false
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
pub fn partial_suffix(text: &str, tag: &str) -> usize {
    tag.char_indices()
        .skip(1)
        .map(|(k, _)| k)
        .filter(|&k| text.ends_with(&tag[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> ThinkTags {
        ThinkTags::detect("{{ '<think>' }}…{{ '</think>' }}").expect("tags")
    }

    /// Feeds `pieces` one by one and returns (reasoning, content) as a client would join them.
    fn split(pieces: &[&str], in_thought: bool) -> (String, String) {
        let mut s = ThoughtSplitter::new(tags(), in_thought);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let out = s.push(p);
            r += &out.reasoning;
            c += &out.content;
        }
        let out = s.finish();
        (r + &out.reasoning, c + &out.content)
    }

    #[test]
    fn a_thought_then_an_answer() {
        let whole = ("I should add.\n".to_string(), "4".to_string());
        assert_eq!(split(&["<think>\nI should add.\n</think>\n\n4"], false), whole);
        // Every cut of the text, the tags included, gives the same split.
        let text = "<think>\nI should add.\n</think>\n\n4";
        for cut in 1..text.len() {
            assert_eq!(split(&[&text[..cut], &text[cut..]], false), whole, "cut at {cut}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(&pieces, false), whole);
    }

    #[test]
    fn no_thought_is_all_answer() {
        assert_eq!(
            split(&["Hello", " <think> is a tag"], false),
            (String::new(), "Hello <think> is a tag".into())
        );
        assert_eq!(split(&["<thi", "s"], false), (String::new(), "<this".into()));
        assert_eq!(split(&["  "], false), (String::new(), "  ".into()));
    }

    #[test]
    fn a_thought_opened_by_the_prompt() {
        assert_eq!(split(&["hmm</th", "ink>ok"], true), ("hmm".into(), "ok".into()));
        assert_eq!(
            split(&["still thinking </thi"], true),
            ("still thinking </thi".into(), String::new())
        );
    }

    #[test]
    fn gemma4_thinks_in_a_channel() {
        let tags = ThinkTags::detect("{{- '<|channel>thought\\n' + thinking_text + '\\n<channel|>' -}}").expect("tags");
        let mut s = ThoughtSplitter::new(tags.clone(), false);
        let mut got = s.push("<|channel>thought\nAdd them.\n<chan");
        let rest = s.push("nel|>4");
        got.reasoning += &rest.reasoning;
        got.content += &rest.content;
        assert_eq!((got.reasoning.trim_end(), got.content.as_str()), ("Add them.", "4"));
        // With thinking off the template closes an empty thought in the prompt.
        assert!(!tags.prompt_opens_thought("<|turn>model\n<|channel>thought\n<channel|>"));
    }

    #[test]
    fn prompts_that_open_a_thought() {
        assert!(tags().prompt_opens_thought("<|im_start|>assistant\n<think>\n"));
        assert!(!tags().prompt_opens_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(ThinkTags::detect("{{ messages }}").is_none());
    }
}
