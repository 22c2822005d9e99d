//! Access control, off by default as in llama-server, vLLM and Ollama: API keys sent as
//! `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`), and the browser origins
//! allowed by CORS.
//!
//! Keys are kept as SHA-256 digests and a presented key is compared with every digest in
//! constant time, so neither the comparison nor the number of keys checked leaks how much of a
//! guess was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, Any, CorsLayer};

use super::anthropic::AnthropicError;
use super::error::ApiError;
use super::ollama::OllamaError;

/// Who may call the API.
#[derive(Clone, Debug, Default)]
pub struct AccessOptions {
    /// Accepted API keys; empty means no key is required.
    pub api_keys: Vec<String>,
    /// Serve `/metrics` without a key even when keys are required.
    pub metrics_public: bool,
    /// Browser origins allowed besides the local ones (`*` allows every origin).
    pub cors_origins: Vec<String>,
}

/// The key check of the `require_api_key` middleware.
#[derive(Debug)]
pub struct KeyPolicy {
    digests: Vec<[u8; 32]>,
    metrics_public: bool,
}

impl KeyPolicy {
    /// The policy of `options`; None when no key is configured.
    pub fn from_options(options: &AccessOptions) -> Option<Arc<Self>> {
        if options.api_keys.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            digests: options.api_keys.iter().map(|k| digest(k)).collect(),
            metrics_public: options.metrics_public,
        }))
    }

    /// Routes that stay open: health probes, and metrics when configured so.
    fn is_open(&self, path: &str) -> bool {
        // The chat page and its assets load without a key: the page asks for one.
        matches!(path, "/health" | "/") || path.starts_with("/ui/") || (self.metrics_public && path == "/metrics")
    }

    /// True when `presented` is one of the keys (every digest is compared).
    fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |any, k| any | k.ct_eq(&d))
            .into()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware: answers 401 in the API's own shape unless the request carries a valid key.
pub async fn require_api_key(State(policy): State<Arc<KeyPolicy>>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS || policy.is_open(req.uri().path()) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    // Anthropic's SDKs and Claude Code send the key as `x-api-key`.
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
    if [bearer, x_api_key].into_iter().flatten().any(|k| policy.accepts(k)) {
        return next.run(req).await;
    }
    let err = ApiError::Unauthorized;
    let path = req.uri().path();
    let mut response = if path.starts_with("/api/") {
        OllamaError(err).into_response()
    } else if path.starts_with("/v1/messages") {
        AnthropicError(err).into_response()
    } else {
        err.into_response()
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// CORS as Ollama does it: local origins (localhost, 127.0.0.1, [::1], 0.0.0.0 on any port,
/// and app/file/tauri pages) are allowed, others only when listed; `*` allows all.
pub fn cors_layer(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let listed: Vec<String> = origins.iter().map(|o| o.trim_end_matches('/').to_string()).collect();
        AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|o| is_local_origin(o) || listed.iter().any(|l| l == o))
        })
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods(AllowMethods::list([
            Method::GET,
            Method::POST,
            Method::HEAD,
            Method::OPTIONS,
            Method::DELETE,
        ]))
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(Any)
}

/// An origin on this machine, or a page of a desktop app.
fn is_local_origin(origin: &str) -> bool {
    if ["app://", "file://", "tauri://"].iter().any(|s| origin.starts_with(s)) {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if rest.starts_with('[') {
        rest.split_inclusive(']').next().unwrap_or(rest)
    } else {
        rest.split(':').next().unwrap_or(rest)
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "0.0.0.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_origins_are_recognised() {
        for o in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://[::1]:5173",
            "app://obsidian.md",
        ] {
            assert!(is_local_origin(o), "{o}");
        }
        for o in [
            "http://evil.example",
            "http://localhost.evil.example",
            "null",
            "http://127.0.0.2",
        ] {
            assert!(!is_local_origin(o), "{o}");
        }
    }

    #[test]
    fn keys_are_accepted_only_exactly() {
        let policy = KeyPolicy::from_options(&AccessOptions {
            api_keys: vec!["alpha".into(), "beta".into()],
            ..AccessOptions::default()
        })
        .expect("keys configured");
        assert!(policy.accepts("alpha") && policy.accepts("beta"));
        assert!(!policy.accepts("alph") && !policy.accepts("alphaa") && !policy.accepts(""));
        assert!(KeyPolicy::from_options(&AccessOptions::default()).is_none());
    }
}
