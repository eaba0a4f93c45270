//! What tokenizing a chat prompt costs the frontend (most of `baton serve`'s CPU per request in
//! the overhead report): `Tokenizer::encode` (with offsets)
//! against `encode_fast` (without), on SmolLM2's tokenizer and `baton bench`'s prompts.
//!
//!   cargo run --release -p baton-benches --example tokenize

use std::time::Instant;

use baton_benches::client::prompts::{load_tokenizer, Length, PromptSource};

fn main() {
    let tok = load_tokenizer("smollm2").expect("the smollm2 tokenizer");
    let source = PromptSource::new(
        tok.clone(),
        "smollm2",
        Length::new("isl", 128, 0.0).unwrap(),
        Length::new("osl", 20, 0.0).unwrap(),
        0,
        1,
    )
    .unwrap();
    let texts: Vec<String> = (0..2000)
        .map(|k| {
            format!(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                source.prompt(k).unwrap().text
            )
        })
        .collect();
    for round in 0..3 {
        let t = Instant::now();
        let mut n = 0;
        for s in &texts {
            n += tok.encode(s.as_str(), false).unwrap().len();
        }
        let slow = t.elapsed().as_secs_f64() / texts.len() as f64;
        let t = Instant::now();
        let mut m = 0;
        for s in &texts {
            m += tok.encode_fast(s.as_str(), false).unwrap().len();
        }
        let fast = t.elapsed().as_secs_f64() / texts.len() as f64;
        assert_eq!(n, m);
        println!(
            "round {round}: encode {:.1} µs, encode_fast {:.1} µs per prompt ({} tokens each)",
            slow * 1e6,
            fast * 1e6,
            n / texts.len()
        );
    }
}
