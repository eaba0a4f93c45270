//! Admin routes (behind `--api-key` like `/v1`): the disaggregation thresholds of the graph,
//! stored as the `disagg` setting in discovery, which every decode worker watches — so a change
//! here reaches all of them, in this process or across hosts.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use runtime::discovery::setting_key;
use runtime::protocol::DisaggThresholds;

use crate::error::ApiError;
use crate::state::{AdminSettings, AppState};

fn admin(state: &AppState) -> Result<&AdminSettings, ApiError> {
    state
        .admin
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this frontend has no admin settings"))
}

fn key(admin: &AdminSettings) -> String {
    setting_key(&admin.namespace, "disagg")
}

/// `GET /admin/disagg`: the thresholds as last set (`null` when never set: the workers use
/// their configured ones).
pub async fn get_disagg(State(state): State<Arc<AppState>>) -> Response {
    let result = async {
        let admin = admin(&state)?;
        let value = admin
            .discovery
            .get_setting(&key(admin))
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok::<_, ApiError>(Json(value.unwrap_or(serde_json::Value::Null)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /admin/disagg` `{"max-local-prefill-length": N, "max-prefill-queue-size": M}`.
pub async fn set_disagg(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let result = async {
        let admin = admin(&state)?;
        let body = super::body_bytes(&state, body).await?;
        let thresholds: DisaggThresholds = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "expected {{\"max-local-prefill-length\": N, \"max-prefill-queue-size\": M}}: {e}"
            ))
        })?;
        let value = serde_json::to_value(thresholds).expect("thresholds serialize");
        admin
            .discovery
            .put_setting(&key(admin), value.clone())
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        tracing::info!(?thresholds, "disaggregation thresholds set");
        Ok::<_, ApiError>(Json(value).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
