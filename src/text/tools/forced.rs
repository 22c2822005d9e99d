//! A grammar that forces a tool call (`tool_choice: "required"` or a named function), in the
//! model's own syntax, with arguments valid against the function's parameter schema.

use serde_json::{json, Value};

use super::{gemma, ToolChoice, ToolSet, ToolSyntax};

/// A Lark grammar (llguidance's dialect) for exactly one call of one of the allowed functions.
/// `token_id` gives the id of a marker that is one added token of the tokenizer (spelled
/// `<[id]>` in the grammar).
pub fn forced_call_grammar(syntax: ToolSyntax, tools: &ToolSet, token_id: impl Fn(&str) -> Option<u32>) -> String {
    let args_key = syntax.arguments_key();
    let alternatives: Vec<Value> = tools
        .functions()
        .filter(|(name, _)| match &tools.choice {
            ToolChoice::Function(wanted) => name == wanted,
            _ => true,
        })
        .map(|(name, params)| {
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, args_key: params},
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let compact = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    let schema = json!({"anyOf": alternatives, "x-guidance": compact});
    let marker = |text: &str| match token_id(text) {
        Some(id) => format!("<[{id}]>"),
        None => Value::from(text).to_string(),
    };
    let body = match syntax {
        ToolSyntax::Hermes => format!(
            "{} \"\\n\" call \"\\n\" {}",
            marker("<tool_call>"),
            marker("</tool_call>")
        ),
        ToolSyntax::Mistral => format!("{} \"[\" call \"]\"", marker("[TOOL_CALLS]")),
        ToolSyntax::Phi4 => format!(
            "{} \"[\" call \"]\" {}",
            marker("<|tool_call|>"),
            marker("<|/tool_call|>")
        ),
        ToolSyntax::Gemma4 => {
            let functions: Vec<(&str, Value)> = tools
                .functions()
                .filter(|(name, _)| match &tools.choice {
                    ToolChoice::Function(wanted) => name == wanted,
                    _ => true,
                })
                .collect();
            return gemma::forced_call_rules(
                &functions,
                &marker("<|tool_call>"),
                &marker("<tool_call|>"),
                &marker(gemma::QUOTE),
            );
        }
        ToolSyntax::Harmony => {
            // One alternative per function: its header, then its arguments (the call's end,
            // `<|call|>`, is an end-of-generation token the constraint allows once complete).
            let rules: Vec<(String, String)> = tools
                .functions()
                .filter(|(name, _)| match &tools.choice {
                    ToolChoice::Function(wanted) => name == wanted,
                    _ => true,
                })
                .enumerate()
                .map(|(i, (name, params))| {
                    let header = format!(
                        "{} \"commentary to=functions.{name} \" {} \"json\" {}",
                        marker("<|channel|>"),
                        marker("<|constrain|>"),
                        marker("<|message|>")
                    );
                    let mut schema = params.clone();
                    if let Value::Object(fields) = &mut schema {
                        fields.insert("x-guidance".into(), compact.clone());
                    }
                    (format!("f{i}: {header} a{i}"), format!("a{i}: %json {schema}"))
                })
                .collect();
            let names: Vec<String> = (0..rules.len()).map(|i| format!("f{i}")).collect();
            let mut grammar = format!("start: {}\n", names.join(" | "));
            for (call, args) in rules {
                grammar.push_str(&format!("{call}\n{args}\n"));
            }
            return grammar;
        }
        ToolSyntax::Llama3 | ToolSyntax::Generic => "call".to_string(),
    };
    format!("start: {body}\ncall: %json {schema}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_names_only_the_chosen_function() {
        let tools = ToolSet {
            tools: vec![
                json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}),
                json!({"type": "function", "function": {"name": "b"}}),
            ],
            choice: ToolChoice::Function("b".into()),
            parallel: true,
        };
        let g = forced_call_grammar(ToolSyntax::Mistral, &tools, |m| (m == "[TOOL_CALLS]").then_some(5));
        assert!(g.starts_with("start: <[5]> \"[\" call \"]\"\n"), "{g}");
        assert!(
            g.contains("{\"const\":\"b\"}") && !g.contains("{\"const\":\"a\"}"),
            "{g}"
        );
        let g = forced_call_grammar(ToolSyntax::Hermes, &tools, |_| None);
        assert!(
            g.starts_with("start: \"<tool_call>\" \"\\n\" call \"\\n\" \"</tool_call>\"\n"),
            "{g}"
        );
    }
}
