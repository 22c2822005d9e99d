//! Gemma 4's own call syntax: `<|tool_call>call:NAME{key:value,…}<tool_call|>`, its values
//! written as its chat template's `format_argument` writes them — strings between `<|"|>`
//! delimiters, numbers, `true`/`false`/`null` bare, objects `{key:value,…}` with bare (or
//! delimited) keys, lists `[…]`. Reading a call body back into a name and JSON arguments, and
//! the Lark grammar that forces one (keys in the template's sorted order, values following the
//! parameter schema where the syntax can say it).

use serde_json::{Map, Number, Value};

/// Gemma 4's string delimiter (one added token in its tokenizer).
pub const QUOTE: &str = "<|\"|>";

/// The call in a block body `call:NAME{…}`; None when it is not one.
pub fn parse_call(body: &str) -> Option<(String, Value)> {
    let rest = body.trim().strip_prefix("call:")?;
    let brace = rest.find('{')?;
    let name = rest[..brace].trim();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c)) {
        return None;
    }
    let mut reader = Reader { text: &rest[brace..] };
    let args = reader.value()?;
    reader.text.trim().is_empty().then_some(())?;
    args.is_object().then(|| (name.to_string(), args))
}

/// A cursor over Gemma-syntax text.
struct Reader<'a> {
    text: &'a str,
}

impl Reader<'_> {
    fn skip_blanks(&mut self) {
        self.text = self.text.trim_start();
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_blanks();
        match self.text.strip_prefix(s) {
            Some(rest) => {
                self.text = rest;
                true
            }
            None => false,
        }
    }

    fn value(&mut self) -> Option<Value> {
        self.skip_blanks();
        if self.eat(QUOTE) {
            return self.string().map(Value::String);
        }
        if self.eat("{") {
            return self.object();
        }
        if self.eat("[") {
            return self.list();
        }
        let end = self.text.find([',', '}', ']']).unwrap_or(self.text.len());
        let word = self.text[..end].trim();
        self.text = &self.text[end..];
        Some(match word {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "null" | "None" => Value::Null,
            // Integers keep every digit that fits 64 bits (the template writes them whole).
            _ => match (word.parse::<i64>(), word.parse::<u64>()) {
                (Ok(i), _) => Value::from(i),
                (_, Ok(u)) => Value::from(u),
                _ => Value::Number(Number::from_f64(word.parse::<f64>().ok()?)?),
            },
        })
    }

    /// The rest of a delimited string (the opening delimiter read).
    fn string(&mut self) -> Option<String> {
        let end = self.text.find(QUOTE)?;
        let s = self.text[..end].to_string();
        self.text = &self.text[end + QUOTE.len()..];
        Some(s)
    }

    /// The rest of an object (its `{` read).
    fn object(&mut self) -> Option<Value> {
        let mut map = Map::new();
        if self.eat("}") {
            return Some(Value::Object(map));
        }
        loop {
            let key = if self.eat(QUOTE) {
                self.string()?
            } else {
                let end = self.text.find(':')?;
                let key = self.text[..end].trim();
                (!key.is_empty() && !key.contains(['{', '}', ',', '[', ']'])).then_some(())?;
                let key = key.to_string();
                self.text = &self.text[end..];
                key
            };
            self.eat(":").then_some(())?;
            map.insert(key, self.value()?);
            if self.eat("}") {
                return Some(Value::Object(map));
            }
            self.eat(",").then_some(())?;
        }
    }

    /// The rest of a list (its `[` read).
    fn list(&mut self) -> Option<Value> {
        let mut items = Vec::new();
        if self.eat("]") {
            return Some(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            if self.eat("]") {
                return Some(Value::Array(items));
            }
            self.eat(",").then_some(())?;
        }
    }
}

/// Lark rules for one call of one of `functions` (name, parameter schema) between the `open`
/// and `close` markers (already written as grammar items), `quote` the string delimiter.
/// Keys come in sorted order, as the template writes them, every property present; strings
/// are delimited text without `<` (within `maxLength`, or matching `pattern`; keys that are not
/// bare words are delimited too), enums and consts are their literals,
/// other scalars are llguidance's JSON rules for their schema (the same text in both
/// syntaxes), lists and objects recurse; anything the schema leaves open is a generic value.
pub fn forced_call_rules(functions: &[(&str, Value)], open: &str, close: &str, quote: &str) -> String {
    let mut g = GrammarBuilder {
        rules: Vec::new(),
        quote: quote.to_string(),
    };
    let alternatives: Vec<String> = functions
        .iter()
        .map(|(name, params)| {
            let args = g.object_body(params);
            format!("{} \"{{\" {args} \"}}\"", Value::from(format!("call:{name}")))
        })
        .collect();
    let mut out = format!("start: {open} ({}) {close}\n", alternatives.join(" | "));
    for rule in &g.rules {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str(&format!(
        "gv: {q} GSTR {q} | GNUM | \"true\" | \"false\" | \"null\" | \"{{\" (gpair (\",\" gpair)*)? \"}}\" | \"[\" (gv (\",\" gv)*)? \"]\"\n\
         gpair: GKEY \":\" gv\n\
         GSTR: /[^<]*/\n\
         GNUM: /-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?/\n\
         GKEY: /[A-Za-z_][A-Za-z0-9_]*/\n",
        q = quote
    ));
    out
}

/// The text of a string `format` (JSON Schema's, as llguidance enforces them for the JSON
/// families), as a regex over the delimited string; None for formats it does not know, which
/// stay free text.
fn format_regex(format: &str) -> Option<&'static str> {
    Some(match format {
        "date" => r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
        "time" => {
            r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
        }
        "date-time" => {
            r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[tT](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
        }
        "uuid" => r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "ipv4" => {
            r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
        }
        "hostname" => {
            r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
        }
        "email" => {
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
        }
        _ => return None,
    })
}

/// Collects the rules a schema needs.
struct GrammarBuilder {
    rules: Vec<String>,
    quote: String,
}

impl GrammarBuilder {
    /// A new rule `name: body`, returning its name.
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push(format!("{name}: {body}"));
        name
    }

    /// The `key:value,…` inside an object's braces (empty for no properties; a generic list of
    /// pairs for an object schema without them).
    fn object_body(&mut self, schema: &Value) -> String {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return "(gpair (\",\" gpair)*)?".into();
        };
        if props.is_empty() {
            return "\"\"".into();
        }
        let mut keys: Vec<&String> = props.keys().collect();
        keys.sort();
        let pairs: Vec<String> = keys
            .iter()
            .map(|k| {
                let value = self.value(&props[k.as_str()]);
                // A key that is not a bare word is delimited, so it reads back whole.
                let bare = !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_');
                let key = match bare {
                    true => Value::from(format!("{k}:")).to_string(),
                    false => format!("{q} {} {q} \":\"", Value::from(k.as_str()), q = self.quote),
                };
                format!("{key} {value}")
            })
            .collect();
        pairs.join(" \",\" ")
    }

    /// A grammar item for a value of `schema`.
    fn value(&mut self, schema: &Value) -> String {
        let q = self.quote.clone();
        let literal = |v: &Value| match v {
            Value::String(s) => Some(format!("{q} {} {q}", Value::from(s.as_str()))),
            other => Some(Value::from(other.to_string()).to_string()),
        };
        if let Some(c) = schema.get("const") {
            return literal(c).unwrap_or_else(|| "gv".into());
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            let alts: Vec<String> = options.iter().filter_map(literal).collect();
            if !alts.is_empty() {
                return format!("({})", alts.join(" | "));
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                let alts: Vec<String> = options.iter().map(|o| self.value(o)).collect();
                return format!("({})", alts.join(" | "));
            }
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("string") if schema.get("pattern").and_then(Value::as_str).is_some() => {
                // JSON Schema patterns match anywhere unless anchored; the text holds no `<`.
                let pattern = schema["pattern"].as_str().unwrap_or_default();
                let start = pattern.strip_prefix('^');
                let end = start.unwrap_or(pattern).strip_suffix('$');
                let core = end.unwrap_or(start.unwrap_or(pattern));
                let (lead, tail) = (
                    if start.is_some() { "" } else { "[^<]*" },
                    if end.is_some() { "" } else { "[^<]*" },
                );
                let text = self.rule(format!("/{lead}(?:{core}){tail}/"));
                format!("{q} {text} {q}")
            }
            Some("string")
                if schema
                    .get("format")
                    .and_then(Value::as_str)
                    .and_then(format_regex)
                    .is_some() =>
            {
                let format = schema["format"].as_str().and_then(format_regex).unwrap_or_default();
                let text = self.rule(format!("/{format}/"));
                format!("{q} {text} {q}")
            }
            Some("string") => {
                let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
                let max = schema.get("maxLength").and_then(Value::as_u64);
                let span = match max {
                    Some(max) => format!("{{{min},{max}}}"),
                    None => format!("{{{min},}}"),
                };
                let text = self.rule(format!("/[^<]{span}/"));
                format!("{q} {text} {q}")
            }
            Some("integer" | "number" | "boolean" | "null") => self.rule(format!("%json {schema}")),
            Some("array") => {
                let item = match schema.get("items") {
                    Some(items) => self.value(items),
                    None => "gv".into(),
                };
                format!("\"[\" ({item} (\",\" {item})*)? \"]\"")
            }
            Some("object") => {
                let body = self.object_body(schema);
                format!("\"{{\" {body} \"}}\"")
            }
            _ => "gv".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_read_back_as_the_template_writes_them() {
        let body = "call:get_weather{city:<|\"|>Paris, TX<|\"|>,days:3,exact:false,tags:[<|\"|>a<|\"|>,2.5],\
                    where:{lat:1,<|\"|>long key<|\"|>:null}}";
        assert_eq!(
            parse_call(body),
            Some((
                "get_weather".into(),
                json!({"city": "Paris, TX", "days": 3, "exact": false, "tags": ["a", 2.5],
                       "where": {"lat": 1, "long key": null}})
            ))
        );
        assert_eq!(parse_call(" call:f{} "), Some(("f".into(), json!({}))));
        assert_eq!(
            parse_call("call:f{id:18446744073709551615,n:-9223372036854775808}"),
            Some(("f".into(), json!({"id": u64::MAX, "n": i64::MIN})))
        );
        for bad in [
            "call:f",
            "call:{x:1}",
            "f{x:1}",
            "call:f{x:}",
            "call:f{x:1} more",
            "call:f{x:<|\"|>open}",
        ] {
            assert_eq!(parse_call(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_forced_grammar_follows_the_schema_in_sorted_key_order() {
        let params = json!({"type": "object", "properties": {
            "zone": {"type": "integer", "minimum": -12, "maximum": 14},
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]}}});
        let g = forced_call_rules(&[("f", params)], "<[7]>", "<[8]>", "<[9]>");
        assert!(
            g.starts_with("start: <[7]> (\"call:f\" \"{\" \"city:\" <[9]> r0 <[9]> \",\" \"unit:\" (<[9]> \"celsius\" <[9]> | <[9]> \"fahrenheit\" <[9]>) \",\" \"zone:\" r1 \"}\") <[8]>\n"),
            "{g}"
        );
        assert!(g.contains("r0: /[^<]{0,12}/\n"), "{g}");
        assert!(
            g.contains("r1: %json {\"type\":\"integer\",\"minimum\":-12,\"maximum\":14}\n"),
            "{g}"
        );
        let formats = json!({"type": "object", "properties": {
            "day": {"type": "string", "format": "date"}, "odd": {"type": "string", "format": "color"}}});
        let g = forced_call_rules(&[("f", formats)], "<[7]>", "<[8]>", "<[9]>");
        assert!(
            g.contains(&format!("r0: /{}/\n", format_regex("date").expect("date"))),
            "{g}"
        );
        assert!(g.contains("r1: /[^<]{0,}/\n"), "an unknown format is free text: {g}");
        let odd = json!({"type": "object", "properties": {
            "a:b": {"type": "string", "pattern": "^[A-Z]{3}$"}, "c": {"type": "string", "pattern": "x+"}}});
        let g = forced_call_rules(&[("f", odd)], "<[7]>", "<[8]>", "<[9]>");
        assert!(g.contains("<[9]> \"a:b\" <[9]> \":\" <[9]> r0 <[9]>"), "{g}");
        assert!(
            g.contains("r0: /(?:[A-Z]{3})/\n") && g.contains("r1: /[^<]*(?:x+)[^<]*/\n"),
            "{g}"
        );
    }
}
