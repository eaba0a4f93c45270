//! OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! that goes with it. User errors are 4xx and name the offending parameter.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// A 503's `Retry-After` in seconds, when the cause knows better than
    /// [`RETRY_AFTER_SECS`] (admission, from how fast slots free).
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Longest error message sent, in bytes: messages quote what the client sent (a model name, a
/// mistyped value), which may be megabytes.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` within [`MAX_MESSAGE_BYTES`]: its head and its tail (where serde says the line
/// and column), the middle elided.
fn clip(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut head = MAX_MESSAGE_BYTES * 2 / 3;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - MAX_MESSAGE_BYTES / 4;
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} … ({} bytes elided) … {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
}

impl ApiError {
    /// 400 naming the parameter, e.g. `bad_param("temperature", "must be in [0, 2]")`.
    pub fn bad_param(param: &str, problem: impl std::fmt::Display) -> Self {
        Self {
            status: 400,
            message: clip(format!("`{param}` {problem}")),
            kind: "invalid_request_error",
            param: Some(clip(param.into())),
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: clip(message.into()),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            message: "missing or invalid API key".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_secs: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: 404,
            message: clip(format!("the model `{model}` does not exist")),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after_secs: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: 413,
            message: format!("request body is larger than {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// 503 telling the client to retry after `retry_after_secs` seconds.
    pub fn unavailable_for(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::unavailable(message)
        }
    }

    /// 408: the request (its body) did not arrive within `--request-timeout`.
    pub fn request_timeout(timeout: std::time::Duration) -> Self {
        Self {
            status: 408,
            message: format!(
                "the request body did not arrive within the request timeout of {} s \
                 (`--request-timeout`)",
                timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after_secs: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// 500: Baton's fault (a worker failed), never the client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "internal_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .expect("error body serializes")
    }
}

/// What a 503 tells the client to wait before retrying, in seconds, unless the error carries
/// its own (admission's, from the measured drain rate): the other causes (no worker, workers at
/// capacity, a worker gone) clear on the scale of a request, and a client that retries at once
/// only adds load.
pub const RETRY_AFTER_SECS: u64 = 1;

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        use axum::http::{header, HeaderValue, StatusCode};
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = self.retry_after_secs.unwrap_or(RETRY_AFTER_SECS);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is left unread, so the connection cannot carry another
            // request; without saying so, a client's pool reuses it and its next request fails.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openais_shape() {
        let e = ApiError::bad_param("top_p", "must be in (0, 1], got 1.5");
        assert_eq!(e.status, 400);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "`top_p` must be in (0, 1], got 1.5");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "top_p");
        assert!(v["error"]["code"].is_null());
        assert_eq!(ApiError::model_not_found("x").status, 404);
    }

    #[test]
    fn long_messages_keep_head_and_tail() {
        let e = ApiError::bad_param(
            "max_tokens",
            format!("got \"{}\" at line 1 column 9", "é".repeat(1 << 20)),
        );
        assert!(
            e.message.len() < 2 * MAX_MESSAGE_BYTES,
            "{}",
            e.message.len()
        );
        assert!(
            e.message.starts_with("`max_tokens` got \"éé"),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with("éé\" at line 1 column 9"),
            "{}",
            e.message
        );
        assert!(e.message.contains("bytes elided"));
        assert_eq!(ApiError::bad_request("short").message, "short");
    }

    #[test]
    fn too_large_closes_the_connection() {
        use axum::response::IntoResponse;
        let r = ApiError::too_large(10).into_response();
        assert_eq!(r.headers()[axum::http::header::CONNECTION], "close");
        let r = ApiError::request_timeout(std::time::Duration::from_secs(30)).into_response();
        assert_eq!(r.status(), 408);
        assert_eq!(r.headers()[axum::http::header::CONNECTION], "close");
        let r = ApiError::bad_request("x").into_response();
        assert!(!r.headers().contains_key(axum::http::header::CONNECTION));
    }

    #[test]
    fn only_503_carries_retry_after() {
        use axum::response::IntoResponse;
        let busy = ApiError::unavailable("full").into_response();
        assert_eq!(busy.status(), 503);
        assert_eq!(busy.headers()[axum::http::header::RETRY_AFTER], "1");
        let queued = ApiError::unavailable_for("queue full", 7).into_response();
        assert_eq!(queued.headers()[axum::http::header::RETRY_AFTER], "7");
        for e in [
            ApiError::bad_request("x"),
            ApiError::unauthorized(),
            ApiError::internal("x"),
        ] {
            let r = e.into_response();
            assert!(!r.headers().contains_key(axum::http::header::RETRY_AFTER));
        }
    }
}
