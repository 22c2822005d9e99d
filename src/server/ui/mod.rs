//! The chat page built into the binary: `GET /` answers a browser (a request that accepts
//! `text/html`) with the page and anything else with Ollama's `Ollama is running`, which
//! Ollama clients probe for; `GET /ui/{asset}` serves its script and style. The assets are
//! embedded at compile time (no CDN, no network) and served under a strict
//! Content-Security-Policy: no inline script, no `eval`, connections to this origin only. The
//! page talks to the server through the public API alone (`/v1/models`, `/api/ps`,
//! `/v1/chat/completions`).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::server::AppState;

/// The page, its script and its style.
const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// What the page may load and do: its own script and style, requests to this origin, nothing
/// inline, nothing framed, no `eval`.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` and `HEAD /`: the chat page for a browser, Ollama's liveness text for everything
/// else (and for every request under `--no-ui`).
#[utoipa::path(method(get, head), path = "/", tag = "operations",
    responses((status = 200, description = "The chat page (`Accept: text/html`), or `Ollama is running`",
        content((String = "text/html"), (String = "text/plain")))))]
pub async fn root(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if state.ui && wants_html {
        return asset_response("text/html; charset=utf-8", INDEX_HTML);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Ollama is running",
    )
        .into_response()
}

/// `GET /ui/{asset}`: the page's script (`app.js`) and style (`app.css`).
#[utoipa::path(get, path = "/ui/{asset}", tag = "operations",
    params(("asset" = String, Path, description = "`app.js` or `app.css`")),
    responses((status = 200, description = "The asset",
        content((String = "text/javascript"), (String = "text/css"))),
        (status = 404, description = "No such asset, or the page is off (`--no-ui`)")))]
pub async fn asset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" if state.ui => asset_response("text/javascript; charset=utf-8", APP_JS),
        "app.css" if state.ui => asset_response("text/css; charset=utf-8", APP_CSS),
        _ => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// An embedded asset with its type and the page's security headers.
fn asset_response(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
