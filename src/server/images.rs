//! Images as the APIs send them, to bytes: OpenAI's `image_url` (a base64 `data:` URL; remote
//! ones are fetched by `image_urls`),
//! Ollama's `images` (bare base64) and Anthropic's `image` blocks (a base64 source). Decoding
//! the pictures themselves is validation's job (`request::ImageProcessor`); this only unwraps
//! the transport, so every API refuses a bad wrapper in its own words.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::text::ChatImage;

/// The bytes of a `data:[<media type>][;base64],<data>` URL (remote URLs are `image_urls`'
/// business).
pub fn from_data_url(url: &str) -> Result<Vec<u8>, String> {
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(40).collect();
        return Err(format!("`{shown}` is not a data: URL"));
    };
    let Some((header, data)) = rest.split_once(',') else {
        return Err("a data: URL needs a comma before its data".into());
    };
    if !header.ends_with(";base64") {
        return Err("a data: URL must be base64-encoded (`data:image/png;base64,…`)".into());
    }
    from_base64(data)
}

/// The bytes of base64 text (standard alphabet; whitespace between lines is allowed).
pub fn from_base64(data: &str) -> Result<Vec<u8>, String> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("is not valid base64: {e}"))
}

/// An image of a turn standing at byte `at` of its text.
pub fn chat_image(bytes: Vec<u8>, at: usize) -> ChatImage {
    ChatImage {
        bytes: Arc::from(bytes),
        at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_unwrap_to_their_bytes() {
        assert_eq!(from_data_url("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert_eq!(from_data_url("data:;base64,aG\nk=").unwrap(), b"hi");
        assert!(from_data_url("https://example.com/cat.png")
            .unwrap_err()
            .contains("not a data: URL"));
        assert!(from_data_url("data:image/png,hi").unwrap_err().contains("base64"));
        assert!(from_data_url("data:image/png;base64").unwrap_err().contains("comma"));
        assert!(from_data_url("data:image/png;base64,@@@")
            .unwrap_err()
            .contains("base64"));
    }
}
