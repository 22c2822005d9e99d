//! Stop strings: never emitted, partial matches held back until resolved.

/// What `StopMatcher::push` decided for a piece of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit now (may be empty while a partial match is held).
    Emit(String),
    /// A stop string matched: emit `before` (everything before the match) and stop.
    Stop {
        /// The final text.
        before: String,
        /// The stop string that matched (Anthropic's `stop_sequence`).
        matched: String,
    },
}

/// Watches generated text for any of a set of stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Emit(text.to_string());
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| Some((self.held.find(s.as_str())?, s)))
            .min_by_key(|(pos, _)| *pos);
        if let Some((pos, stop)) = first {
            let outcome = StopOutcome::Stop {
                before: self.held[..pos].to_string(),
                matched: stop.clone(),
            };
            self.held.clear();
            return outcome;
        }
        let keep = self.longest_partial_suffix();
        let emit_len = self.held.len() - keep;
        let out = self.held[..emit_len].to_string();
        self.held.drain(..emit_len);
        StopOutcome::Emit(out)
    }

    /// Releases text held back for a partial match once generation ended without a match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > best && self.held.ends_with(&stop[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(before: &str, matched: &str) -> StopOutcome {
        StopOutcome::Stop {
            before: before.into(),
            matched: matched.into(),
        }
    }

    #[test]
    fn holds_back_a_partial_stop_and_trims_the_match() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.push("Hello"), StopOutcome::Emit("Hello".into()));
        assert_eq!(m.push(" world\nUs"), StopOutcome::Emit(" world".into()));
        assert_eq!(m.push("er: hi"), stop("", "\nUser:"));
    }

    #[test]
    fn releases_held_text_when_the_partial_match_breaks() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("a ST"), StopOutcome::Emit("a ".into()));
        assert_eq!(m.push("AY"), StopOutcome::Emit("STAY".into()));
        assert_eq!(m.push("ST"), StopOutcome::Emit("".into()));
        assert_eq!(m.flush(), "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "cd".into()]);
        assert_eq!(m.push("a cd b"), stop("a ", "cd"));
    }

    #[test]
    fn multibyte_stop_strings_are_matched_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caf"), StopOutcome::Emit("caf".into()));
        assert_eq!(m.push("é"), StopOutcome::Emit("".into()));
        assert_eq!(m.push("!"), stop("", "é!"));
    }
}
