//! One log line per HTTP request, as Ollama's and llama-server's logs have one: method, path,
//! status and the time to the response's head (a stream's first bytes), at info. Probes and
//! scrapes (`/health`, `/metrics`) and the chat page's assets are logged at debug, so that
//! they do not drown the rest.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// Paths machines poll (or a page loads), logged at debug.
fn is_routine(path: &str) -> bool {
    matches!(path, "/health" | "/metrics") || path.starts_with("/ui/")
}

/// The middleware: logs each request once its response head is ready.
pub async fn log_request(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    if is_routine(&path) {
        tracing::debug!(%method, %path, status, ms, "request");
    } else {
        tracing::info!(%method, %path, status, ms, "request");
    }
    response
}
