//! Ollama's context fitting for `/api/chat`: a conversation whose prompt does not fit the
//! context keeps its system messages, its tools and its latest user turn, and drops its oldest
//! other turns, whole, until it fits (Ollama's `chatPrompt` does the same; `truncate: false`
//! refuses instead). A turn starts at a user message, so a call and its results go together.

use super::ollama::OllamaError;
use crate::request::{GenerationSpec, Prompt, RequestError, ValidatedRequest};
use crate::server::registry::ModelLease;
use crate::server::AppState;
use crate::text::ChatMessage;

/// Validates `spec`; when its conversation is too long for the context and `truncate` allows,
/// validates the longest tail of it that fits (the fewest oldest turns dropped), found by
/// bisection over turn starts, each try one render and tokenization.
pub async fn validate_fitted(
    state: &AppState,
    model: &ModelLease,
    spec: GenerationSpec,
    truncate: bool,
) -> Result<ValidatedRequest, OllamaError> {
    let too_long = match state.validate(model, spec.clone()).await {
        Ok(request) => return Ok(request),
        Err(e @ RequestError::ContextLength { .. }) if truncate => e,
        Err(e) => return Err(e.into()),
    };
    let Prompt::Chat(chat) = &spec.prompt else {
        return Err(too_long.into());
    };
    let cuts = turn_starts(&chat.messages);
    let attempt = |cut: usize| {
        let mut fitted = spec.clone();
        if let Prompt::Chat(c) = &mut fitted.prompt {
            c.messages = kept_from(&chat.messages, cut);
        }
        state.validate(model, fitted)
    };
    // The most that may go (everything before the latest user turn) must fit, else nothing does.
    let Some(&last) = cuts.last() else {
        return Err(too_long.into());
    };
    let mut best = match attempt(last).await {
        Ok(request) => (last, request),
        Err(e) => return Err(e.into()),
    };
    // Bisect for the earliest cut that fits: fits(cuts[hi]) holds, fits(cut before lo) fails.
    let (mut lo, mut hi) = (0, cuts.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match attempt(cuts[mid]).await {
            Ok(request) => {
                best = (cuts[mid], request);
                hi = mid;
            }
            Err(RequestError::ContextLength { .. }) => lo = mid + 1,
            Err(e) => return Err(e.into()),
        }
    }
    let (cut, request) = best;
    let dropped = chat.messages[..cut].iter().filter(|m| m.role != "system").count();
    tracing::info!(
        dropped_messages = dropped,
        kept_messages = chat.messages.len() - dropped,
        prompt_tokens = request.prompt().len(),
        "the conversation did not fit the context: its oldest turns were dropped"
    );
    Ok(request)
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

    fn conversation(roles: &[&str]) -> Vec<ChatMessage> {
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| ChatMessage::new(*r, format!("{i}")))
            .collect()
    }

    #[test]
    fn turns_start_at_user_messages_after_the_first_turn() {
        let m = conversation(&[
            "system",
            "user",
            "assistant",
            "tool",
            "user",
            "assistant",
            "system",
            "user",
        ]);
        assert_eq!(turn_starts(&m), [4, 7]);
        assert_eq!(turn_starts(&conversation(&["system", "user"])), Vec::<usize>::new());
        assert_eq!(turn_starts(&conversation(&["user", "assistant", "user"])), [2]);
    }

    #[test]
    fn a_cut_keeps_the_system_messages_before_it() {
        let m = conversation(&[
            "system",
            "user",
            "assistant",
            "tool",
            "user",
            "assistant",
            "system",
            "user",
        ]);
        let kept: Vec<String> = kept_from(&m, 7).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["0", "6", "7"]);
        let kept: Vec<String> = kept_from(&m, 4).into_iter().map(|m| m.content).collect();
        assert_eq!(kept, ["0", "4", "5", "6", "7"]);
    }
}
