//! The tokenizer and chat template rebuilt from the SmolLM2 GGUF against the golden outputs
//! transformers produced (`shared/golden/`): ids, decoded text and rendered prompts, exactly.

use engine::loader::{gguf, smollm2_path};
use engine::ModelCard;
use processor::{ChatMessage, ChatTemplate};
use serde_json::Value;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/golden/smollm2-135m-instruct-q4_1.json"
);

fn golden() -> Value {
    let text = std::fs::read_to_string(GOLDEN).expect("golden file readable");
    serde_json::from_str(&text).expect("golden file is JSON")
}

fn card() -> ModelCard {
    gguf::load_card(&smollm2_path().expect("SmolLM2 GGUF installed")).expect("card loads")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|id| id.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn tokenizer_matches_golden_cases() {
    let golden = golden();
    let card = card();
    let cases = golden["tokenizer_cases"]
        .as_array()
        .expect("tokenizer_cases");
    assert!(!cases.is_empty());
    for case in cases {
        let id = case["id"].as_str().unwrap_or("?");
        let text = case["text"].as_str().expect("text");
        let encoding = card.tokenizer.encode(text, false).expect("encodes");
        assert_eq!(
            encoding.get_ids(),
            ids(&case["token_ids"]),
            "case `{id}`: ids"
        );
        let decoded = card
            .tokenizer
            .decode(encoding.get_ids(), false)
            .expect("decodes");
        assert_eq!(
            decoded,
            case["decoded"].as_str().expect("decoded"),
            "case `{id}`: decode"
        );
    }
}

#[test]
fn smollm_pre_tokenizer_splits_digits_like_llama_cpp() {
    // The GGUF says `tokenizer.ggml.pre = smollm`; the golden file lists the ids that
    // pre-tokenizer gives where it differs from transformers' plain GPT-2 one.
    let golden = golden();
    let card = card();
    let examples = golden["tokenizer_notes"]["pretokenizer_divergence_examples"]
        .as_array()
        .expect("divergence examples");
    for ex in examples {
        let text = ex["text"].as_str().expect("text");
        let encoding = card.tokenizer.encode(text, false).expect("encodes");
        assert_eq!(
            encoding.get_ids(),
            ids(&ex["token_ids_smollm_pretokenizer"]),
            "{text:?}"
        );
    }
}

#[test]
fn chat_template_renders_golden_prompts() {
    let golden = golden();
    let card = card();
    assert_eq!(
        card.chat_template.as_deref(),
        golden["chat_template"].as_str()
    );
    let token = |id: Option<u32>| id.and_then(|id| card.tokenizer.id_to_token(id));
    let template = ChatTemplate::new(
        card.chat_template
            .as_deref()
            .expect("GGUF has a chat template"),
        token(card.bos_token_id),
        token(card.eos_token_ids.first().copied()),
    )
    .expect("template compiles");
    let chats: Vec<&Value> = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == "chat")
        .collect();
    assert!(!chats.is_empty());
    for case in chats {
        let id = case["id"].as_str().unwrap_or("?");
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let rendered = template.render(&messages, true).expect("renders");
        assert_eq!(
            rendered,
            case["rendered_prompt"].as_str().expect("rendered_prompt"),
            "case `{id}`"
        );
        let encoding = card.tokenizer.encode(rendered, false).expect("encodes");
        assert_eq!(
            encoding.get_ids(),
            ids(&case["prompt_token_ids"]),
            "case `{id}`: ids"
        );
    }
}

#[test]
fn card_has_special_tokens_and_no_bos_by_default() {
    let golden = golden();
    let card = card();
    let config = &golden["config"];
    assert_eq!(
        card.bos_token_id,
        Some(config["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        card.eos_token_ids,
        vec![config["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(
        card.add_bos_token,
        config["tokenizer_adds_bos"].as_bool().unwrap()
    );
    assert_eq!(
        card.max_context,
        config["max_position_embeddings"].as_u64().unwrap() as usize
    );
    // With `add_special_tokens = true` nothing is prepended either, as `add_bos_token` is false.
    let plain = card.tokenizer.encode("Hello", true).unwrap();
    assert_eq!(
        plain.get_ids(),
        card.tokenizer.encode("Hello", false).unwrap().get_ids()
    );
}

/// Token by token, the incremental detokenizer emits exactly the full decode of each golden
/// text (multi-byte characters split across byte-level tokens included), with no broken
/// character in any delta, both from a cold start and after a prompt's context.
#[test]
fn incremental_detokenization_equals_full_decode() {
    let golden = golden();
    let card = card();
    let tok = &card.tokenizer;
    let shared = std::sync::Arc::new(tok.clone());
    let context = tok
        .encode("Say something:", false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    let mut split_chars = 0;
    for case in golden["tokenizer_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let ids = tok.encode(text, false).expect("encodes").get_ids().to_vec();
        let full = tok.decode(&ids, true).expect("decodes");
        for ctx in [&[][..], &context[..]] {
            let mut detok = processor::Detokenizer::new(shared.clone(), ctx, true);
            let mut out = String::new();
            for &id in &ids {
                let delta = detok.push(id).expect("detokenizes");
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{text:?}: broken char in {delta:?}"
                );
                if delta.is_empty() {
                    split_chars += 1;
                }
                out.push_str(&delta);
            }
            out.push_str(&detok.flush().expect("flushes"));
            assert_eq!(out, full, "{text:?}");
        }
    }
    assert!(
        split_chars > 0,
        "some golden text splits a character across tokens"
    );
}
