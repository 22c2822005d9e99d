//! Tools for chat templates that know nothing of them (Gemma 3, Phi-3): the tools are
//! described in the system message, earlier calls are written back as the JSON the model was
//! asked for, and tool results become user turns, so any template can render the exchange.

use serde_json::Value;

use crate::text::ChatMessage;

/// What the model is told about calling functions, before the tool list.
pub const GENERIC_INSTRUCTIONS: &str =
    "You can call the following functions. To call one, reply with only a JSON object \
of the form {\"name\": <function name>, \"arguments\": <object of argument values>} and nothing else; \
to call several, write one such object per line. If no function is needed, answer normally.\n\nFunctions:";

/// `messages` rewritten for a template without tool support.
pub fn describe_tools_in_messages(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut listing = GENERIC_INSTRUCTIONS.to_string();
    for tool in tools {
        listing.push('\n');
        listing.push_str(&tool.get("function").unwrap_or(tool).to_string());
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(first) if first.role == "system" => {
            out.push(ChatMessage::new("system", format!("{}\n\n{listing}", first.content)))
        }
        _ => out.push(ChatMessage::new("system", listing)),
    }
    let skip = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let calls = m.tool_calls.iter().flatten().map(call_as_json);
                let text: Vec<String> = std::iter::once(m.content.clone())
                    .filter(|c| !c.is_empty())
                    .chain(calls)
                    .collect();
                out.push(ChatMessage::new("assistant", text.join("\n")));
            }
            "tool" => {
                let result = format!("Result of {}: {}", result_name(m, messages), m.content);
                match out.last_mut() {
                    Some(last) if last.role == "user" => {
                        last.content.push('\n');
                        last.content.push_str(&result);
                    }
                    _ => out.push(ChatMessage::new("user", result)),
                }
            }
            _ => out.push(m.clone()),
        }
    }
    out
}

/// `{"name": …, "arguments": …}` of an OpenAI-shaped call.
fn call_as_json(call: &Value) -> String {
    let f = call.get("function").unwrap_or(call);
    serde_json::json!({"name": f.get("name"), "arguments": f.get("arguments")}).to_string()
}

/// The function a tool result answers: the message's own name, else the call it names by id.
fn result_name(message: &ChatMessage, messages: &[ChatMessage]) -> String {
    if let Some(name) = &message.name {
        return name.clone();
    }
    let id = message.tool_call_id.as_deref();
    messages
        .iter()
        .flat_map(|m| m.tool_calls.iter().flatten())
        .find(|c| id.is_some() && c.get("id").and_then(Value::as_str) == id)
        .and_then(|c| c.get("function")?.get("name")?.as_str())
        .unwrap_or("the function")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_round_trip_becomes_plain_turns() {
        let call = json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls = Some(vec![call]);
        let mut result = ChatMessage::new("tool", "18C");
        result.tool_call_id = Some("call_1".into());
        let messages = [ChatMessage::new("user", "Weather?"), assistant, result];
        let tools = [json!({"type": "function", "function": {"name": "get_weather"}})];
        let out = describe_tools_in_messages(&messages, &tools);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(
            out[0].content.ends_with("Functions:\n{\"name\":\"get_weather\"}"),
            "{}",
            out[0].content
        );
        assert_eq!(
            out[2].content,
            "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}"
        );
        assert_eq!(out[3].content, "Result of get_weather: 18C");
        assert!(out.iter().all(|m| m.tool_calls.is_none()));
    }
}
