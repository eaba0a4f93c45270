//! OpenAI request bodies as clients send them. Parsing is lenient where OpenAI's and vLLM's
//! servers are (unknown fields ignored, several shapes of `prompt`, `stop` and `content`) and
//! strict about types: a wrongly typed field is a 400 that names it.

pub mod request;
pub mod response;

pub use request::{
    ChatCompletionRequest, CommonParams, CompletionRequest, ContentPart, Message, MessageContent,
    Prompt, StopStrings, StreamOptions,
};
pub use response::{
    sse_data, unix_now, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatDelta, ChatLogprobs, ChatMessageOut, ChatTokenLogprob, Completion, CompletionChoice,
    CompletionChunk, CompletionLogprobs, ModelList, ModelObject, PromptTokensDetails, TopLogprob,
    TopLogprobMap, Usage, UsageField,
};

use serde::de::{DeserializeOwned, IgnoredAny};

use crate::ApiError;

type PathError = serde_path_to_error::Error<serde_json::Error>;

/// Parses a JSON body. A body that is not a JSON object is a 400 that says where it breaks
/// (line and column), with no `param`; a field that is mistyped, out of range, missing, given
/// twice or nested too deeply is a 400 whose `param` is the field's path
/// (`messages[0].content`), as OpenAI names it.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    check_syntax(body)?;
    deserialize::<T>(body).map_err(|e| {
        // `#[serde(flatten)]` buffers the shared fields and checks them after the others, out
        // of the path's sight: find the field from those alone.
        let e = match deserialize::<CommonParams>(body) {
            Err(common) if e.path().to_string() == "." && !is_missing(&e) => common,
            _ => e,
        };
        field_error(e)
    })
}

/// Syntax first, over the whole body, so a broken body is reported as broken JSON even when a
/// field before the break is also mistyped. Skipping values checks no number's range nor any
/// depth (serde_json skips iteratively); the typed pass does both.
fn check_syntax(body: &[u8]) -> Result<(), ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::bad_request(format!(
            "invalid JSON body: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    serde_json::from_slice::<IgnoredAny>(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid request: the body must be a JSON object",
        ));
    }
    Ok(())
}

fn deserialize<T: DeserializeOwned>(body: &[u8]) -> Result<T, PathError> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body))
}

/// The field serde names in its message for a missing or repeated field (the path stops at the
/// struct that lacks it), and what is wrong with it.
fn named_field(message: &str) -> Option<(&str, &'static str)> {
    [
        ("missing field `", "is required"),
        ("duplicate field `", "is given more than once"),
    ]
    .into_iter()
    .find_map(|(prefix, problem)| {
        let field = message.strip_prefix(prefix)?.split('`').next()?;
        Some((field, problem))
    })
}

fn is_missing(e: &PathError) -> bool {
    named_field(&e.inner().to_string()).is_some()
}

fn field_error(e: PathError) -> ApiError {
    let path = e.path().to_string();
    // The path runs up to 128 levels into a too-deep nesting; the field that holds it is what
    // the client needs to know.
    let top = match e.path().iter().next() {
        Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
        _ => None,
    };
    let message = e.into_inner().to_string();
    if let Some((field, problem)) = named_field(&message) {
        let param = if path == "." {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return ApiError::bad_param(&param, problem);
    }
    match top {
        None => ApiError::bad_request(format!("invalid request: {message}")),
        Some(top) if message.starts_with("recursion limit exceeded") => ApiError::bad_param(
            &top,
            format!("is nested too deeply (at most 128 levels): {message}"),
        ),
        Some(_) => ApiError::bad_param(&path, format!("is invalid: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_error(body: &str) -> ApiError {
        parse::<ChatCompletionRequest>(body.as_bytes()).unwrap_err()
    }

    const MSGS: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn field_errors_name_the_path() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for (fields, param) in [
            (r#""max_tokens":"x""#.to_string(), "max_tokens"),
            (r#""temperature":[]"#.into(), "temperature"),
            (r#""max_tokens":-1"#.into(), "max_tokens"),
            (r#""max_tokens":1e999"#.into(), "max_tokens"),
            (r#""max_tokens":18446744073709551616"#.into(), "max_tokens"),
            (r#""n":4294967296"#.into(), "n"),
            (
                r#""stream_options":{"include_usage":3}"#.into(),
                "stream_options.include_usage",
            ),
            (format!(r#""stop":{deep}"#), "stop"),
            (format!(r#""seed":{deep}"#), "seed"),
        ] {
            let e = chat_error(&format!(r#"{{"model":"m",{MSGS},{fields}}}"#));
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{fields}: {e}"
            );
        }
        for (body, param) in [
            (r#"{"model":"m"}"#.to_string(), "messages"),
            (format!("{{{MSGS}}}"), "model"),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#.into(),
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#.into(),
                "messages[0].content",
            ),
            (format!(r#"{{"model":1e999,{MSGS}}}"#), "model"),
            (format!(r#"{{"model":"m","model":"m",{MSGS}}}"#), "model"),
        ] {
            let e = chat_error(&body);
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{body}: {e}"
            );
        }
        let e = parse::<CompletionRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"), "{e}");
    }

    #[test]
    fn broken_json_names_no_field_but_says_where() {
        for body in [
            &b"{\"model\": "[..],
            b"",
            b"{\"model\": NaN}",
            b"{\"temperature\": \"hot\", \"model\": }",
            b"{} {}",
        ] {
            let e = parse::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, None), "{body:?}");
            assert!(e.message.contains("line 1 column"), "{e}");
        }
        for body in [&b"{\"model\": \"\xff\"}"[..], b"[]", b"null", b"\"x\""] {
            let e = parse::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, None), "{body:?}");
        }
    }
}
