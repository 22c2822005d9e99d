//! Real chat templates: golden renders of six families, and the 70-template corpus.

mod common;

use common::{ids, read_json, shared};
use mlxd::text::{ChatMessage, ChatTemplate, TextCodec};

#[test]
fn family_templates_render_the_golden_examples_byte_for_byte() {
    for family in [
        "llama3.2",
        "qwen2.5",
        "qwen3",
        "gemma3",
        "mistral-nemo",
        "phi3-reconstructed",
    ] {
        let dir = shared(&format!("tokenizers/{family}"));
        let codec = TextCodec::load(&dir, &[]).expect("codec");
        let golden = read_json(&dir.join("chat_template_examples.json"));
        let template = codec.chat_template().expect("family ships a chat template");
        for case in golden["cases"].as_array().expect("cases") {
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).expect("messages");
            let add = case["add_generation_prompt"].as_bool().expect("flag");
            let rendered = template
                .render_with(&messages, add, &golden["extra_template_variables"])
                .unwrap_or_else(|e| panic!("{family}: {}", e.0));
            assert_eq!(rendered, case["rendered"].as_str().expect("rendered"), "{family}");
            assert_eq!(
                codec.encode(&rendered, false).expect("encode"),
                ids(&case["ids"]),
                "{family} ids"
            );
        }
    }
}

fn simple_conversation() -> Vec<ChatMessage> {
    [
        ("user", "Hello!"),
        ("assistant", "Hi, how can I help?"),
        ("user", "Tell me a joke."),
    ]
    .iter()
    .map(|(role, content)| ChatMessage::new(*role, *content))
    .collect()
}

#[test]
fn every_corpus_template_renders_or_fails_clearly() {
    let dir = shared("tokenizers/chat_templates");
    let mut rendered = 0;
    let mut failures = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .collect();
    paths.sort();
    assert_eq!(paths.len(), 70);
    for path in &paths {
        let source = std::fs::read_to_string(path).expect("read");
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        // Loading compiles the template and renders a short conversation; a template that
        // cannot do that fails right there, naming the cause.
        match ChatTemplate::new(&source, "<s>", "</s>") {
            Ok(template) => {
                let text = template
                    .render(&simple_conversation(), true)
                    .unwrap_or_else(|e| panic!("{name} loaded but failed to render: {}", e.0));
                assert!(
                    text.contains("Tell me a joke."),
                    "{name} lost the last message:\n{text}"
                );
                rendered += 1;
            }
            Err(e) => {
                assert!(e.0.starts_with("chat template "), "{name}: unclear error {}", e.0);
                failures.push(format!("{name}: {}", e.0));
            }
        }
    }
    // Only a template that cannot work without `functions` being passed fails (as it does
    // under transformers).
    assert_eq!(
        failures,
        vec![
            "fireworks-ai-llama-3-firefunction-v2.jinja: chat template cannot render a simple user/assistant \
             conversation: tried to use + operator on unsupported types string and undefined (`functions` is \
             undefined)"
                .to_string()
        ]
    );
    assert_eq!(rendered, 69);
}
