//! A property test of what `baton serve` does with bad HTTP bodies (issue 15, "bad input").
//! Each case is one request to `/v1/chat/completions` or `/v1/completions`, built from a valid
//! body by one or more mutations — a field (any the endpoints read, or OpenAI's that Baton
//! ignores) set to a value of the wrong type, null, a huge, negative or fractional number,
//! `n` and `max_tokens` at their limits and one past, nesting up to 10 000 deep, a string up
//! to 10 MB, thousands of stop strings; a required field removed; an unknown field added — or a
//! raw body that is no JSON object (invalid UTF-8, truncated, `NaN` / `Infinity`, empty) or
//! has the wrong content type. Every answer is a 200 or a 4xx, never a 5xx: a 4xx carries
//! OpenAI's error JSON, and when one field was mutated a 400 names it (or a path under it) as
//! `param`; a 200 is a well-formed completion (a stream ends in `[DONE]`) of few tokens. After
//! the run the server still serves, and its log shows no panic. It runs on the mock engine, so
//! a 200 costs next to nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Cases per endpoint.
const CASES: u32 = 200;
/// The base bodies' `max_tokens`: a 200 stays cheap.
const BASE_MAX_TOKENS: u64 = 2;

/// A value as raw JSON text: JSON numbers like `1e999` have no `serde_json::Value`.
type Raw = String;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    fn base(self) -> Vec<(String, Raw)> {
        let input = match self {
            Endpoint::Chat => ("messages", r#"[{"role":"user","content":"hi"}]"#),
            Endpoint::Completions => ("prompt", r#""hi""#),
        };
        [
            ("model", format!("\"{MODEL}\"")),
            (input.0, input.1.to_string()),
            ("max_tokens", BASE_MAX_TOKENS.to_string()),
            ("temperature", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn required(self) -> [&'static str; 2] {
        match self {
            Endpoint::Chat => ["model", "messages"],
            Endpoint::Completions => ["model", "prompt"],
        }
    }
}

/// Every field either endpoint reads, then some of OpenAI's that Baton accepts and ignores.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "ignore_eos",
    "nvext",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "user",
    "suffix",
    "best_of",
    "response_format",
    "tools",
    "tool_choice",
];

/// Values of every JSON type, the integer types' edges and past them, and strings that are
/// hard to decode.
const SCALARS: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "0.5",
    "-0.5",
    "1.5",
    "129",
    "2147483648",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1e300",
    "-1e300",
    "1e999",
    "-1e999",
    "1e-999",
    r#""""#,
    r#""x""#,
    r#""smollm2""#,
    r#""user""#,
    r#""\u0000""#,
    r#""\ud800""#,
    r#""é🙂""#,
    "[]",
    "{}",
    "[null]",
    "[1]",
    "[-1]",
    "[1.5]",
    r#"["a"]"#,
    r#"[""]"#,
    "[[]]",
    "[[1,2],[3]]",
    r#"{"a":1}"#,
    r#"{"include_usage":true}"#,
    r#"{"ignore_eos":"yes"}"#,
    r#"[{"role":"user","content":"x"}]"#,
    r#"[{"role":"user","content":[{"type":"text","text":"a"}]}]"#,
    r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#,
    r#"[{"role":"user"}]"#,
    r#"[{"content":"x"}]"#,
];

#[derive(Clone)]
enum Mutation {
    Set(String, Raw),
    Remove(String),
    /// A field no OpenAI server reads (its name starts with `x_`).
    Extra(String, Raw),
}

#[derive(Clone)]
enum Case {
    Fields(Vec<Mutation>),
    Raw {
        ctype: Option<&'static str>,
        body: Vec<u8>,
        /// Whether it must be a 400 naming no parameter (else: the body is valid JSON).
        broken: bool,
    },
}

/// Cases are printed on failure; a 10 MB body is not.
fn clip(text: &str) -> String {
    if text.len() <= 200 {
        return text.to_string();
    }
    let mut end = 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

impl std::fmt::Debug for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mutation::Set(k, v) => write!(f, "set {k} = {}", clip(v)),
            Mutation::Remove(k) => write!(f, "remove {k}"),
            Mutation::Extra(k, v) => write!(f, "extra {k} = {}", clip(v)),
        }
    }
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Case::Fields(m) => write!(f, "{m:?}"),
            Case::Raw { ctype, body, .. } => {
                write!(f, "raw {ctype:?} {}", clip(&String::from_utf8_lossy(body)))
            }
        }
    }
}

fn body_text(endpoint: Endpoint, mutations: &[Mutation]) -> String {
    let mut fields = endpoint.base();
    for m in mutations {
        match m {
            Mutation::Set(k, v) => match fields.iter_mut().find(|(name, _)| name == k) {
                Some(field) => field.1 = v.clone(),
                None => fields.push((k.clone(), v.clone())),
            },
            Mutation::Remove(k) => fields.retain(|(name, _)| name != k),
            Mutation::Extra(k, v) => fields.push((k.clone(), v.clone())),
        }
    }
    let inner: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// `depth` nested arrays or objects around a 1.
fn deep(depth: usize, arrays: bool) -> Raw {
    if arrays {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }
}

/// A string of up to ~10 MB (most short; the longest over the 8 MiB body limit).
fn long_string() -> impl Strategy<Value = Raw> {
    let len = prop_oneof![
        6 => 0usize..2_000,
        3 => 2_000usize..200_000,
        1 => 200_000usize..10_500_000,
    ];
    let unit = prop::sample::select(&["a", "ab ", "é", "🙂", "\\n", "\\\"", "\\u00e9"][..]);
    (len, unit).prop_map(|(len, unit)| {
        let mut s = String::with_capacity(len + 2);
        s.push('"');
        while s.len() < len {
            s.push_str(unit);
        }
        s.push('"');
        s
    })
}

/// Up to 5 000 stop strings of up to 40 bytes.
fn stop_list() -> impl Strategy<Value = Raw> {
    (0usize..5_000, 0usize..40).prop_map(|(count, len)| {
        let one = serde_json::to_string(&"s".repeat(len)).unwrap();
        format!("[{}]", vec![one; count].join(","))
    })
}

/// Any field's bad (or odd) value; the field-specific edges are in [`cases`].
fn value() -> impl Strategy<Value = Raw> {
    prop_oneof![
        8 => prop::sample::select(SCALARS).prop_map(str::to_string),
        2 => any::<i64>().prop_map(|v| v.to_string()),
        2 => any::<f64>().prop_map(|v| serde_json::Number::from_f64(v).map_or("0".into(), |n| n.to_string())),
        2 => (1usize..=10_000, any::<bool>()).prop_map(|(d, arrays)| deep(d, arrays)),
        2 => long_string(),
        1 => stop_list(),
    ]
}

fn cases(endpoint: Endpoint, max_tokens_limit: u64) -> impl Strategy<Value = Case> {
    let field = prop::sample::select(FIELDS).prop_map(str::to_string);
    let set = (field, value())
        .prop_map(|(k, v)| Mutation::Set(k, v))
        .boxed();
    // The limits: `n` up to 128, `max_tokens` up to what the context leaves the prompt.
    let edge = prop::sample::select(vec![
        ("n", "128".to_string()),
        ("n", "129".to_string()),
        ("max_tokens", max_tokens_limit.to_string()),
        ("max_tokens", (max_tokens_limit + 1).to_string()),
        ("max_completion_tokens", max_tokens_limit.to_string()),
        ("max_completion_tokens", (max_tokens_limit + 1).to_string()),
        ("stop", stop_list_of(64)),
        ("stop", stop_list_of(65)),
        ("stop", format!("\"{}\"", "s".repeat(1024))),
        ("stop", format!("\"{}\"", "s".repeat(1025))),
        ("model", r#""gpt-4o""#.to_string()),
        // Prompts × n is bounded at 2048 choices.
        ("prompt", format!("[{}]", vec!["[1]"; 2049].join(","))),
        ("prompt", format!("[{}]", vec!["\"a\""; 2048].join(","))),
        // Just under the 8 MiB body limit: tokenized, then over the context.
        (endpoint.required()[1], long_input(endpoint)),
        // Over it: 413 before anything reads it.
        ("user", format!("\"{}\"", "a".repeat(10 << 20))),
    ])
    .prop_map(|(k, v)| Mutation::Set(k.to_string(), v));
    let remove = prop::sample::select(endpoint.required().to_vec())
        .prop_map(|k| Mutation::Remove(k.to_string()));
    let extra = ("x_[a-z_]{0,12}", value()).prop_map(|(k, v)| Mutation::Extra(k, v));
    let one = prop_oneof![6 => set.clone(), 2 => edge, 1 => remove, 2 => extra];
    prop_oneof![
        6 => one.prop_map(|m| Case::Fields(vec![m])),
        2 => prop::collection::vec(set, 2..5).prop_map(Case::Fields),
        3 => raw(endpoint),
    ]
}

/// A prompt of 7 MiB.
fn long_input(endpoint: Endpoint) -> Raw {
    let text = format!("\"{}\"", "ab ".repeat((7 << 20) / 3));
    match endpoint {
        Endpoint::Chat => format!(r#"[{{"role":"user","content":{text}}}]"#),
        Endpoint::Completions => text,
    }
}

fn stop_list_of(count: usize) -> Raw {
    format!("[{}]", vec!["\"s\""; count].join(","))
}

/// Bodies that are not JSON objects, and a valid one under the wrong content type.
fn raw(endpoint: Endpoint) -> impl Strategy<Value = Case> {
    let valid = body_text(endpoint, &[]).into_bytes();
    let len = valid.len();
    let (v1, v2, v3) = (valid.clone(), valid.clone(), valid.clone());
    prop_oneof![
        // Bytes no UTF-8 text holds, anywhere in the body.
        (
            0..=len,
            prop::sample::select(&[0xffu8, 0xfe, 0xc0, 0x80, 0xed][..])
        )
            .prop_map(move |(at, byte)| {
                let mut body = v1.clone();
                body.insert(at, byte);
                Case::Raw {
                    ctype: Some("application/json"),
                    body,
                    broken: true,
                }
            }),
        (0..len).prop_map(move |cut| Case::Raw {
            ctype: Some("application/json"),
            body: v2[..cut].to_vec(),
            broken: true,
        }),
        prop::sample::select(&["NaN", "Infinity", "-Infinity", "nan", "inf"][..]).prop_map(
            move |literal| {
                let text = body_text(
                    endpoint,
                    &[Mutation::Set("temperature".into(), literal.into())],
                );
                Case::Raw {
                    ctype: Some("application/json"),
                    body: text.into_bytes(),
                    broken: true,
                }
            }
        ),
        prop::sample::select(
            &[
                None,
                Some("text/plain"),
                Some("application/x-www-form-urlencoded")
            ][..]
        )
        .prop_map(move |ctype| Case::Raw {
            ctype,
            body: v3.clone(),
            broken: false
        }),
    ]
}

struct Tally {
    tried: AtomicUsize,
    server_errors: AtomicUsize,
    /// Answers by status, to show what the cases reached.
    statuses: Mutex<BTreeMap<u16, usize>>,
}

/// The answer to one case, checked.
async fn check(
    client: &reqwest::Client,
    url: &str,
    endpoint: Endpoint,
    case: &Case,
    tally: &Tally,
) {
    let (ctype, body) = match case {
        Case::Fields(m) => (
            Some("application/json"),
            body_text(endpoint, m).into_bytes(),
        ),
        Case::Raw { ctype, body, .. } => (*ctype, body.clone()),
    };
    let mut request = client.post(url).body(body.clone());
    if let Some(ctype) = ctype {
        request = request.header("content-type", ctype);
    }
    let resp = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case:?}: the request failed: {e}"));
    let status = resp.status().as_u16();
    tally.tried.fetch_add(1, Ordering::Relaxed);
    *tally.statuses.lock().unwrap().entry(status).or_default() += 1;
    if status >= 500 {
        tally.server_errors.fetch_add(1, Ordering::Relaxed);
    }
    let is_stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    assert!(
        status == 200 || (400..500).contains(&status),
        "{case:?}: answered {status}: {}",
        clip(&resp.text().await.unwrap_or_default())
    );
    let chat = endpoint == Endpoint::Chat;
    if status == 200 {
        let sent: Option<Value> = serde_json::from_slice(&body).ok();
        let include_usage = sent
            .as_ref()
            .is_some_and(|v| v["stream_options"]["include_usage"] == true);
        let choices = if is_stream {
            let stream = collect_stream(resp).await;
            let (choices, usage) = assemble(&stream, chat, include_usage);
            if let Some(usage) = usage {
                check_usage(&usage);
            }
            choices.len()
        } else {
            let (_, v) = read_json(resp).await;
            check_answer(&v, chat);
            let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
            let n = v["choices"].as_array().unwrap().len();
            let limits_touched = matches!(case, Case::Fields(m) if m.iter().any(|m| matches!(
                m, Mutation::Set(k, _) if k.starts_with("max_")
            )));
            if !limits_touched {
                assert!(
                    tokens <= BASE_MAX_TOKENS * n as u64,
                    "{case:?}: {tokens} tokens"
                );
            }
            n
        };
        assert!(choices >= 1, "{case:?}: no choice");
        return;
    }
    let (_, v) = read_json(resp).await;
    let what = format!("{case:?}");
    assert_openai_error(&v, &what);
    let param = v["error"]["param"].as_str();
    match case {
        Case::Raw { broken: true, .. } => {
            assert_error(status, &v, 400, None, &what);
        }
        Case::Raw { broken: false, .. } => panic!("{what}: a valid body answered {status}: {v}"),
        Case::Fields(m) if m.len() == 1 && status == 400 => {
            let (Mutation::Set(field, _) | Mutation::Extra(field, _) | Mutation::Remove(field)) =
                &m[0];
            let names = param.is_some_and(|p| {
                p == field
                    || p.strip_prefix(field.as_str())
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            });
            assert!(names, "{what}: the 400 does not name `{field}`: {v}");
        }
        Case::Fields(m) if m.len() == 1 && matches!(m[0], Mutation::Remove(_)) => {
            panic!("{what}: a missing required field answered {status}: {v}")
        }
        Case::Fields(_) => {}
    }
}

#[test]
fn bad_bodies_get_4xx_naming_the_field_never_5xx() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = mock_server();
    let client = client();
    let tally = Tally {
        tried: AtomicUsize::new(0),
        server_errors: AtomicUsize::new(0),
        statuses: Mutex::default(),
    };

    // What `max_tokens` may be beside the base chat prompt: the context less its tokens.
    let limits = runtime.block_on(async {
        let mut limits = Vec::new();
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let url = server.url(endpoint.path());
            let body: Value = serde_json::from_str(&body_text(endpoint, &[])).unwrap();
            let v = ok_json(&client, &url, &body).await;
            let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
            let over = with(body, serde_json::json!({"max_tokens": u32::MAX}));
            let (_, e) = post_json(&client, &url, &over).await;
            let message = e["error"]["message"].as_str().unwrap_or_default();
            let context: u64 = message
                .split("context of ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no context in {e}"));
            limits.push(context - prompt);
        }
        limits
    });

    let mut outcome = Vec::new();
    for (endpoint, limit) in [Endpoint::Chat, Endpoint::Completions]
        .into_iter()
        .zip(limits)
    {
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        });
        let url = server.url(endpoint.path());
        let result = runner.run(&cases(endpoint, limit), |case| {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(check(&client, &url, endpoint, &case, &tally))
            }));
            if let Err(panic) = outcome {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(TestCaseError::fail(text));
            }
            Ok(())
        });
        outcome.push((endpoint, result));
    }
    println!(
        "bad inputs tried: {}, 5xx: {}",
        tally.tried.load(Ordering::Relaxed),
        tally.server_errors.load(Ordering::Relaxed)
    );
    println!("answers by status: {:?}", tally.statuses.lock().unwrap());
    for (endpoint, result) in outcome {
        if let Err(e) = result {
            panic!("{endpoint:?}: {e}\n{}", server.log_tail());
        }
    }

    // Still serving, and nothing panicked on the way.
    runtime.block_on(async {
        let chat = server.url("/v1/chat/completions");
        check_chat(&ok_json(&client, &chat, &chat_body("hi", 2)).await);
    });
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("panicked"), "{}", server.log_tail());
}
