//! `/v1/models`, `/health` (a worker can serve), `/live` (the process answers), `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::protocol::{unix_now, ModelList, ModelObject};
use crate::state::AppState;

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList::new(vec![ModelObject::new(
        state.model.name.clone(),
        unix_now(),
    )]))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let workers = state.router.instances().len();
    if workers == 0 {
        return ApiError::unavailable("no worker is registered").into_response();
    }
    Json(serde_json::json!({"status": "healthy", "workers": workers})).into_response()
}

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.set_engine(&state.router.loads());
    state.router.refresh_metrics();
    state
        .metrics
        .set_admission_queued(state.admission().queued());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
