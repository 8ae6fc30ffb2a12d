//! gRPC-Web (`application/grpc-web`, `+proto`, `-text`) over HTTP/1.1 and HTTP/2.
//!
//! tonic-web translates a gRPC-Web request into gRPC (base64-decoding `-text` bodies), calls
//! the gRPC routes, and translates the response back: the `application/grpc-web*` content type
//! of the request, and the status trailers as the last frame of the body (flag 0x80); a
//! trailers-only answer (an error before any message) gets its status moved from the headers
//! into that frame too, so every response ends with one ([`trailers_in_body`]). CORS
//! ([`cors`]) lets browsers call it from any origin, and exposes the gRPC status headers.

use axum::body::Body;
use axum::http::{header, HeaderName};
use axum::response::Response;
use base64::Engine;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

/// The gRPC routes behind the gRPC-Web translation.
pub fn router(grpc: axum::Router) -> axum::Router {
    axum::Router::new()
        .fallback_service(grpc)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(axum::middleware::map_response(trailers_in_body))
}

/// A trailers-only response (the status in the headers, no body) gets its status as the
/// body's trailer frame, as gRPC-Web clients expect at the end of every response.
pub async fn trailers_in_body(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let Some(status) = h.remove("grpc-status") else {
        return resp;
    };
    let mut trailer = Vec::new();
    trailer.extend_from_slice(b"grpc-status:");
    trailer.extend_from_slice(status.as_bytes());
    trailer.extend_from_slice(b"\r\n");
    for name in ["grpc-message", "grpc-status-details-bin"] {
        if let Some(v) = h.remove(name) {
            trailer.extend_from_slice(name.as_bytes());
            trailer.push(b':');
            trailer.extend_from_slice(v.as_bytes());
            trailer.extend_from_slice(b"\r\n");
        }
    }
    let mut frame = vec![0x80];
    frame.extend_from_slice(&(trailer.len() as u32).to_be_bytes());
    frame.extend_from_slice(&trailer);
    let text = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web-text"));
    h.remove(header::CONTENT_LENGTH);
    let body = if text {
        Body::from(base64::engine::general_purpose::STANDARD.encode(frame))
    } else {
        Body::from(frame)
    };
    *resp.body_mut() = body;
    resp
}

/// CORS for every route: any origin, the request's method and headers, and the gRPC status
/// headers readable by scripts.
pub fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(std::time::Duration::from_secs(24 * 60 * 60))
}
