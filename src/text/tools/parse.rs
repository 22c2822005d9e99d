//! Reading calls out of the text of a call block: JSON objects (one, several separated by
//! `,` or `;`, or a list of them) with a name and arguments, Mistral's `name[ARGS]{…}`, or
//! Gemma 4's `call:name{…}`.

use serde_json::{Map, Value};

/// The calls in `body` (the text after the opening marker, up to its closing one) as
/// (name, arguments object); None when it is not a well-formed call, so the text stays content.
pub fn parse_calls(body: &str) -> Option<Vec<(String, Value)>> {
    let body = strip_python_tag(body);
    if body.starts_with("call:") {
        return super::gemma::parse_call(body).map(|call| vec![call]);
    }
    if body.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        return body.split("[TOOL_CALLS]").map(named_call).collect();
    }
    let mut calls = Vec::new();
    for value in json_values(body)? {
        match value {
            Value::Array(items) => {
                for item in items {
                    calls.push(call_of(item)?);
                }
            }
            value => calls.push(call_of(value)?),
        }
    }
    (!calls.is_empty()).then_some(calls)
}

/// Whether `body` already holds one whole call (so a reply limited to one call can end).
pub fn holds_a_call(body: &str) -> bool {
    let body = strip_python_tag(body);
    let json = match body.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        true => match body.find('{') {
            Some(i) => &body[i..],
            None => return false,
        },
        false => body.trim_start().trim_start_matches('[').trim_start(),
    };
    let mut values = serde_json::Deserializer::from_str(json).into_iter::<Value>();
    matches!(values.next(), Some(Ok(Value::Object(_))))
}

fn strip_python_tag(body: &str) -> &str {
    let body = body.trim_start();
    body.strip_prefix("<|python_tag|>").unwrap_or(body).trim_start()
}

/// `name[ARGS]{…}` or `name{…}` (Mistral's newer format).
fn named_call(part: &str) -> Option<(String, Value)> {
    let part = part.trim();
    let brace = part.find('{')?;
    let name = part[..brace].trim_end().trim_end_matches("[ARGS]").trim();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c)) {
        return None;
    }
    let args: Value = serde_json::from_str(part[brace..].trim()).ok()?;
    args.is_object().then(|| (name.to_string(), args))
}

/// Every JSON value in `text`, separated by blanks, `,` or `;`; None if anything else is there.
fn json_values(text: &str) -> Option<Vec<Value>> {
    let mut values = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',' || c == ';');
        if rest.is_empty() {
            return (!values.is_empty()).then_some(values);
        }
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        rest = &rest[stream.byte_offset()..];
        values.push(value);
    }
}

/// `{"name", "arguments" | "parameters"}`, or the same inside `{"function": …}`; arguments
/// given as a JSON string are read as the object they spell.
fn call_of(value: Value) -> Option<(String, Value)> {
    let Value::Object(mut obj) = value else {
        return None;
    };
    if let Some(Value::Object(f)) = obj.remove("function") {
        obj = f;
    }
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj
        .remove("arguments")
        .or_else(|| obj.remove("parameters"))
        .unwrap_or(Value::Object(Map::new()));
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        args => args,
    };
    args.is_object().then_some((name, args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(body: &str) -> Option<Vec<String>> {
        parse_calls(body).map(|c| c.into_iter().map(|(n, _)| n).collect())
    }

    #[test]
    fn each_family_s_call_bodies() {
        // Hermes (the text between <tool_call> and </tool_call>).
        let hermes = parse_calls("\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n");
        assert_eq!(hermes, Some(vec![("get_weather".into(), json!({"city": "Paris"}))]));
        // Llama 3: parameters, python tag, several separated by `;`.
        assert_eq!(
            parse_calls(
                "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}; {\"name\": \"g\", \"parameters\": {}}"
            ),
            Some(vec![("f".into(), json!({"x": 1})), ("g".into(), json!({}))])
        );
        // Mistral: a list, and the newer name[ARGS]{…} form.
        assert_eq!(
            names("[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {}}]"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_calls("f[ARGS]{\"x\": 1}[TOOL_CALLS]g{}"),
            Some(vec![("f".into(), json!({"x": 1})), ("g".into(), json!({}))])
        );
        // Gemma 4.
        assert_eq!(
            parse_calls("call:f{x:<|\"|>y<|\"|>}"),
            Some(vec![("f".into(), json!({"x": "y"}))])
        );
        // Arguments as a JSON string, and the OpenAI shape.
        assert_eq!(
            parse_calls("{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 2}\"}}"),
            Some(vec![("f".into(), json!({"x": 2}))])
        );
    }

    #[test]
    fn anything_else_is_not_a_call() {
        for body in [
            "",
            "{\"name\": \"f\"",
            "{\"x\": 1}",
            "{\"name\": \"f\", \"arguments\": 3}",
            "[1, 2]",
            "{} trailing",
            "f[ARGS]",
        ] {
            assert_eq!(parse_calls(body), None, "{body}");
        }
    }

    #[test]
    fn a_whole_call_is_noticed() {
        assert!(!holds_a_call("[{\"name\": \"a\", \"argum"));
        assert!(holds_a_call("[{\"name\": \"a\", \"arguments\": {}}, {\"na"));
        assert!(holds_a_call("f[ARGS]{\"x\": 1}"));
        assert!(!holds_a_call("f[ARGS]{\"x\":"));
    }
}
