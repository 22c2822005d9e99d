//! Tokenizer, chat template and incremental detokenizer on real tokenizers.

mod common;

use common::{ids, read_json, shared};
use mlxd::text::tools::{ToolChoice, ToolSet, ToolSyntax};
use mlxd::text::{ChatMessage, ChatPrompt, IncrementalDetokenizer, TextCodec};

#[test]
fn stories_tokenizer_matches_reference_encodings() {
    let dir = shared("models/stories260k");
    let codec = TextCodec::load(&dir, &[]).expect("codec");
    let reference = read_json(&dir.join("reference.json"));
    for case in reference["tokenizer"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let got = codec.encode(text, true).expect("encodes");
        assert_eq!(got, ids(&case["ids_with_bos"]), "{text:?}");
        assert_eq!(codec.decode(&got), case["decoded"].as_str().expect("decoded"));
    }
}

#[test]
fn stories_chat_template_renders_the_reference_byte_for_byte() {
    let dir = shared("models/stories260k");
    let codec = TextCodec::load(&dir, &[2, 1]).expect("codec");
    let example = &read_json(&dir.join("reference.json"))["chat_template_example"];
    let messages: Vec<ChatMessage> = serde_json::from_value(example["messages"].clone()).expect("messages");
    let chat = ChatPrompt::new(messages);
    assert_eq!(
        codec.render_chat(&chat).expect("renders"),
        example["rendered"].as_str().expect("rendered")
    );
    assert_eq!(
        codec.encode_chat(&chat).expect("encodes"),
        ids(&example["ids_no_extra_special_tokens"])
    );
}

#[test]
fn stories_eos_ids_come_from_generation_config() {
    let codec = TextCodec::load(&shared("models/stories260k"), &[2]).expect("codec");
    assert_eq!(codec.eos_ids(), &[2, 1]);
}

#[test]
fn unknown_roles_fail_with_the_templates_own_message() {
    let codec = TextCodec::load(&shared("models/stories260k"), &[]).expect("codec");
    let chat = ChatPrompt::new(vec![ChatMessage::new("tool", "x")]);
    let err = codec.render_chat(&chat).expect_err("template raises");
    assert!(err.0.contains("Unsupported role: tool"), "{}", err.0);
}

/// Streams `text` through the detokenizer token by token with a byte-level BPE tokenizer whose
/// tokens split multi-byte characters.
#[test]
fn incremental_detokenizer_never_splits_multibyte_characters() {
    let tokenizer = tokenizers::Tokenizer::from_file(shared("tokenizers/llama3.2/tokenizer.json")).expect("tokenizer");
    let text = "Grüße aus Köln 😀🎉 — 東京タワー, naïve café. 🇺🇳 done";
    let ids = tokenizer.encode(text, false).expect("encodes").get_ids().to_vec();
    let prompt = tokenizer.encode("Say:", false).expect("encodes").get_ids().to_vec();
    let mut detok = IncrementalDetokenizer::new(&prompt);
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let delta = detok.push(&tokenizer, id);
        assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
        if delta.is_empty() {
            held_back += 1;
        }
        out.push_str(&delta);
    }
    out.push_str(&detok.flush(&tokenizer));
    assert_eq!(out.trim_start(), text);
    assert!(held_back > 0, "this text has tokens that end mid-character");
}

/// llama.cpp's tokenizer vectors: `.inp` strings separated by `__ggml_vocab_test__` lines,
/// `.out` expected ids per line, encoded without special tokens.
fn vector_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = shared("tokenizers/test_vectors");
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).expect("inp");
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).expect("out");
    let mut texts: Vec<String> = inp.split("\n__ggml_vocab_test__\n").map(str::to_string).collect();
    if texts.last().is_some_and(|t| t.is_empty()) {
        texts.pop();
    }
    let expected: Vec<Vec<u32>> = out
        .split('\n')
        .take(texts.len())
        .map(|l| l.split_whitespace().map(|x| x.parse().expect("id")).collect())
        .collect();
    assert_eq!(expected.len(), texts.len());
    texts.into_iter().zip(expected).collect()
}

#[test]
fn served_family_tokenizers_pass_llama_cpp_test_vectors() {
    let pairs = [
        ("llama-bpe", "llama3.2"),
        ("qwen2", "qwen2.5"),
        ("qwen2", "qwen3"),
        ("gemma-4", "gemma3"),
        ("phi-3", "phi3-reconstructed"),
        ("llama-spm", "llama2-reconstructed"),
    ];
    for (vectors, folder) in pairs {
        let codec = TextCodec::load(&shared(&format!("tokenizers/{folder}")), &[]).expect("codec");
        let cases = vector_cases(vectors);
        assert!(cases.len() >= 40, "{vectors}: {} cases", cases.len());
        for (text, want) in cases {
            assert_eq!(
                codec.encode(&text, false).expect("encodes"),
                want,
                "{folder} on {text:?}"
            );
        }
    }
}

/// Phi-4-mini's template (as published with the model) reads the tool list from the system
/// turn's `tools` field; its calls come back between `<|tool_call|>` markers.
#[test]
fn phi4_mini_templates_get_their_tools_on_the_system_turn() {
    let template = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";
    let dir = std::env::temp_dir().join(format!("mlxd-phi4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(shared("fixtures/phi3/f32").join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(dir.join("chat_template.jinja"), template).expect("template");
    let codec = TextCodec::load(&dir, &[]).expect("codec");
    assert_eq!(codec.tool_syntax(), ToolSyntax::Phi4);
    let mut chat = ChatPrompt::new(vec![ChatMessage::new("user", "Weather?")]);
    chat.tools = ToolSet {
        tools: vec![
            serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}),
        ],
        choice: ToolChoice::Auto,
        parallel: true,
    };
    let rendered = codec.render_chat(&chat).expect("renders");
    assert_eq!(
        rendered,
        "<|system|><|tool|>[{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\"}}]<|/tool|><|end|><|user|>Weather?<|end|><|assistant|>"
    );
    let plan = codec.reply_plan(&chat, &rendered);
    let mut parser = mlxd::text::ReplyParser::new(&plan);
    let mut calls = parser
        .push("<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]<|/tool_call|>")
        .tool_calls;
    calls.extend(parser.finish().tool_calls);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].name.as_str(), calls[0].arguments.as_str()),
        ("get_weather", "{\"city\":\"Oslo\"}")
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
