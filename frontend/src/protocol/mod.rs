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

use serde::de::DeserializeOwned;

use crate::ApiError;

/// Parses a JSON body; a type error names the field's path (`messages[0].content`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    serde_path_to_error::deserialize::<_, T>(&value).map_err(|e| {
        // `#[serde(flatten)]` hides the path of the shared fields: find it from those alone.
        let e = match serde_path_to_error::deserialize::<_, CommonParams>(&value) {
            Err(common) if e.path().to_string() == "." => common,
            _ => e,
        };
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(format!("invalid request: {}", e.into_inner()))
        } else {
            ApiError::bad_param(&path, format!("is invalid: {}", e.into_inner()))
        }
    })
}
