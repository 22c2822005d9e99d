//! Fitting a conversation to the context, as Ollama fits one: a chat whose prompt does not fit
//! keeps its system messages, its tools and its latest user turn, and drops its oldest other
//! turns, whole, until it fits (Ollama's `chatPrompt`); when even what it keeps leaves no room
//! for a reply, tokens are cut out of the prompt's middle (as Ollama's runner cuts them). A turn
//! starts at a user message, so a call and its results go together. Ollama's `/api/chat` and
//! `/api/generate` fit unless `truncate: false`; OpenAI's chat completions unless the server is
//! `--strict-context`; the Responses API with `truncation: "auto"`.

use crate::request::{GenerationSpec, Overflow, Prompt, RequestError, ValidatedRequest};
use crate::server::registry::ModelLease;
use crate::server::AppState;
use crate::text::ChatMessage;

/// Validates `spec`; when `fit` and its prompt is too long for the context, validates the
/// longest tail of its conversation that fits (the fewest oldest turns dropped, found by
/// bisection over turn starts, each try one render and tokenization), or, when not even its
/// latest turn fits, that turn with the prompt's middle cut.
pub async fn validate_fitted(
    state: &AppState,
    model: &ModelLease,
    spec: GenerationSpec,
    fit: bool,
) -> Result<ValidatedRequest, RequestError> {
    match state.validate(model, spec.clone()).await {
        Err(RequestError::ContextLength { .. }) if fit => {}
        done => return done,
    }
    let cut_middle = |mut spec: GenerationSpec| {
        spec.overflow = Overflow::CutMiddle;
        state.validate(model, spec)
    };
    let Prompt::Chat(chat) = &spec.prompt else {
        return cut_middle(spec).await;
    };
    let cuts = turn_starts(&chat.messages);
    let fitted = |cut: usize| {
        let mut fitted = spec.clone();
        if let Prompt::Chat(c) = &mut fitted.prompt {
            c.messages = kept_from(&chat.messages, cut);
        }
        fitted
    };
    // The most that may go (everything before the latest user turn) must fit, else only a cut
    // through the middle of what is left can.
    let Some(&last) = cuts.last() else {
        return cut_middle(spec).await;
    };
    let mut best = match state.validate(model, fitted(last)).await {
        Ok(request) => (last, request),
        Err(RequestError::ContextLength { .. }) => {
            let request = cut_middle(fitted(last)).await?;
            log_dropped(&chat.messages, last, &request);
            return Ok(request);
        }
        Err(e) => return Err(e),
    };
    // Bisect for the earliest cut that fits: fits(cuts[hi]) holds, fits(cut before lo) fails.
    let (mut lo, mut hi) = (0, cuts.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match state.validate(model, fitted(cuts[mid])).await {
            Ok(request) => {
                best = (cuts[mid], request);
                hi = mid;
            }
            Err(RequestError::ContextLength { .. }) => lo = mid + 1,
            Err(e) => return Err(e),
        }
    }
    let (cut, request) = best;
    log_dropped(&chat.messages, cut, &request);
    Ok(request)
}

/// Logs what fitting dropped: the messages before `cut` that are not system ones.
fn log_dropped(messages: &[ChatMessage], cut: usize, request: &ValidatedRequest) {
    let dropped = messages[..cut].iter().filter(|m| m.role != "system").count();
    tracing::info!(
        dropped_messages = dropped,
        kept_messages = messages.len() - dropped,
        prompt_tokens = request.prompt().len(),
        "the conversation did not fit the context: its oldest turns were dropped"
    );
}

/// Where the conversation may be cut, earliest first: every user message after the first
/// message that is not a system one (cutting there drops at least one turn).
fn turn_starts(messages: &[ChatMessage]) -> Vec<usize> {
    let first = messages
        .iter()
        .position(|m| m.role != "system")
        .unwrap_or(messages.len());
    (first + 1..messages.len())
        .filter(|&i| messages[i].role == "user")
        .collect()
}

/// The conversation cut at `cut`: the system messages before it, then everything from it on.
fn kept_from(messages: &[ChatMessage], cut: usize) -> Vec<ChatMessage> {
    messages[..cut]
        .iter()
        .filter(|m| m.role == "system")
        .chain(&messages[cut..])
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conversation with system turns before and inside it, and a tool result.
    const MIXED: [&str; 8] = [
        "system",
        "user",
        "assistant",
        "tool",
        "user",
        "assistant",
        "system",
        "user",
    ];

    fn conversation(roles: &[&str]) -> Vec<ChatMessage> {
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| ChatMessage::new(*r, format!("{i}")))
            .collect()
    }

    #[test]
    fn turns_start_at_user_messages_after_the_first_turn() {
        let m = conversation(&MIXED);
        assert_eq!(turn_starts(&m), [4, 7]);
        assert_eq!(turn_starts(&conversation(&["system", "user"])), Vec::<usize>::new());
        assert_eq!(turn_starts(&conversation(&["user", "assistant", "user"])), [2]);
    }

    #[test]
    fn a_cut_keeps_the_system_messages_before_it() {
        let m = conversation(&MIXED);
        let kept: Vec<String> = kept_from(&m, 7).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["0", "6", "7"]);
        let kept: Vec<String> = kept_from(&m, 4).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["0", "4", "5", "6", "7"]);
    }
}
