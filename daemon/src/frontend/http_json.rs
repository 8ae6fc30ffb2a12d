//! HTTP/JSON transcoding (stub).
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::Frontend;

/// Serves one HTTP/JSON request.
pub async fn handle(_frontend: &Frontend, _req: Request) -> Response {
    StatusCode::NOT_FOUND.into_response()
}
