//! Remote images: the `http(s)` image URLs of a request, fetched when the server was started
//! with `--allow-image-urls`, before the request is converted (conversion stays synchronous and
//! only looks the bytes up). Off by default: a server that fetches what its clients name can be
//! made to read its own network. When on, every fetch has a size and a time limit, follows at
//! most a few redirects (each checked like the first URL), takes no proxy from the environment,
//! and — unless the operator named the hosts — connects only to public addresses: names
//! resolving to loopback, private, link-local or other special ranges are refused, whichever
//! redirect or DNS answer leads there.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Url};

/// Which image URLs the server fetches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImageUrlPolicy {
    /// None: only base64 `data:` URLs are accepted.
    #[default]
    Refused,
    /// Any host whose addresses are all public.
    Public,
    /// Only these hosts (by name or address, compared without case), which may be private: an
    /// image store on the operator's own network.
    Hosts(Vec<String>),
}

impl ImageUrlPolicy {
    /// From `--allow-image-urls`' values: none given means any public host.
    pub fn from_hosts(hosts: &[String]) -> Self {
        if hosts.is_empty() {
            Self::Public
        } else {
            Self::Hosts(hosts.iter().map(|h| h.to_ascii_lowercase()).collect())
        }
    }

    /// Whether `url` may be fetched (scheme and host; a public host's addresses are checked
    /// when it is resolved).
    fn admits(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("only http(s) image URLs are fetched, not {}:", url.scheme()));
        }
        let Some(host) = url.host_str() else {
            return Err("the image URL has no host".into());
        };
        // The URL parser writes every address form (`0x7f.1`, `[::1]`) in its canonical one.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.admits_address(ip, &host);
        }
        match self {
            Self::Refused => Err(refused()),
            Self::Public => Ok(()),
            Self::Hosts(hosts) if hosts.contains(&host) => Ok(()),
            Self::Hosts(_) => Err(format!(
                "host {host} is not among the hosts given to --allow-image-urls"
            )),
        }
    }

    fn admits_address(&self, ip: IpAddr, shown: &str) -> Result<(), String> {
        match self {
            Self::Refused => Err(refused()),
            Self::Public if is_public(ip) => Ok(()),
            Self::Public => Err(format!(
                "{shown} is not a public address; image URLs are fetched only from public ones"
            )),
            Self::Hosts(hosts) if hosts.iter().any(|h| h.trim_matches(['[', ']']) == shown) => Ok(()),
            Self::Hosts(_) => Err(format!(
                "host {shown} is not among the hosts given to --allow-image-urls"
            )),
        }
    }
}

fn refused() -> String {
    "image URLs are fetched only when the server is started with --allow-image-urls; send the image as a base64 data: URL".into()
}

/// Whether `ip` is an ordinary public unicast address: not loopback, private, link-local,
/// shared (CGNAT), multicast, broadcast, unspecified, documentation or reserved, nor an IPv6
/// form of one (mapped, NAT64, unique-local). Written here because std's `is_global` is
/// unstable.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

/// Resolves names through the system's resolver and keeps only public addresses; a name with
/// none fails. Public mode connects through it, so a DNS answer cannot lead to the server's own
/// network.
struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to no public address; image URLs are fetched only from public ones")
                        .into();
                return Err(err);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The limits of one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    /// Largest image body.
    pub max_bytes: usize,
    /// Longest a fetch may take, connection and body included.
    pub timeout: Duration,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// Most distinct remote images one request may name.
    pub max_urls: usize,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            // OpenAI's own limit on an image.
            max_bytes: 20 << 20,
            timeout: Duration::from_secs(10),
            max_redirects: 3,
            max_urls: crate::engine::MAX_IMAGES_PER_REQUEST,
        }
    }
}

/// Fetches the image URLs of requests, as its policy allows.
#[derive(Clone)]
pub struct ImageFetcher {
    policy: Arc<ImageUrlPolicy>,
    limits: FetchLimits,
    client: Option<reqwest::Client>,
}

impl Default for ImageFetcher {
    fn default() -> Self {
        Self::new(ImageUrlPolicy::Refused, FetchLimits::default()).expect("a refusing fetcher builds no client")
    }
}

impl ImageFetcher {
    /// A fetcher under `policy` and `limits`.
    pub fn new(policy: ImageUrlPolicy, limits: FetchLimits) -> anyhow::Result<Self> {
        let policy = Arc::new(policy);
        let client = match *policy {
            ImageUrlPolicy::Refused => None,
            _ => {
                let checked = policy.clone();
                let max_redirects = limits.max_redirects;
                let mut builder = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(limits.timeout)
                    .user_agent(concat!("mlxd/", env!("CARGO_PKG_VERSION")))
                    .redirect(redirect::Policy::custom(move |attempt| {
                        if attempt.previous().len() > max_redirects {
                            return attempt.error(format!("more than {max_redirects} redirects"));
                        }
                        match checked.admits(attempt.url()) {
                            Ok(()) => attempt.follow(),
                            Err(e) => attempt.error(format!("redirected: {e}")),
                        }
                    }));
                if *policy == ImageUrlPolicy::Public {
                    builder = builder.dns_resolver(Arc::new(PublicResolver));
                }
                Some(builder.build()?)
            }
        };
        Ok(Self { policy, limits, client })
    }

    /// Fetches the distinct remote URLs among `urls` (`(field, url)`; `data:` URLs are left to
    /// conversion) at once. A URL the policy refuses, or a failed fetch, is an error naming its
    /// field.
    pub async fn fetch_all(&self, urls: Vec<(String, String)>) -> Result<RemoteImages, (String, String)> {
        let mut distinct: Vec<(String, String)> = Vec::new();
        for (field, url) in urls {
            if is_remote(&url) && !distinct.iter().any(|(_, u)| *u == url) {
                distinct.push((field, url));
            }
            // One past the limit is refused below; the rest need not be compared.
            if distinct.len() > self.limits.max_urls {
                break;
            }
        }
        if distinct.len() > self.limits.max_urls {
            let (field, _) = distinct.swap_remove(self.limits.max_urls);
            return Err((
                field,
                format!("more than {} image URLs in one request", self.limits.max_urls),
            ));
        }
        let fetched = try_join_all(distinct.into_iter().map(|(field, url)| async move {
            match self.fetch(&url).await {
                Ok(bytes) => Ok((url, Arc::<[u8]>::from(bytes))),
                Err(e) => Err((field, e)),
            }
        }))
        .await?;
        Ok(RemoteImages(fetched.into_iter().collect()))
    }

    /// The body of one image URL, within the limits.
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let parsed = Url::parse(url).map_err(|e| format!("is not a valid URL: {e}"))?;
        self.policy.admits(&parsed)?;
        let client = self.client.as_ref().ok_or_else(refused)?;
        let shown = shown(url);
        let mut response = client.get(parsed).send().await.map_err(|e| fetch_error(&shown, &e))?;
        if !response.status().is_success() {
            return Err(format!("fetching {shown} gave HTTP {}", response.status()));
        }
        let max = self.limits.max_bytes;
        let too_big = || format!("the image at {shown} is larger than {max} bytes");
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fetch_error(&shown, &e))? {
            if body.len() + chunk.len() > max {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A URL as errors show it: at most 80 characters.
fn shown(url: &str) -> String {
    url.chars().take(80).collect()
}

/// A failed fetch in words, with the innermost cause (a refused address, a timeout).
fn fetch_error(shown: &str, e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    if e.is_timeout() {
        return format!("fetching {shown} timed out");
    }
    format!("fetching {shown} failed: {cause}")
}

/// Whether an image URL names something to fetch (not a `data:` URL, which carries its bytes).
/// Callers collect only these, so a request's inline images are not copied to be skipped.
pub fn is_remote(url: &str) -> bool {
    !url.starts_with("data:")
}

/// The images fetched for one request, by URL.
#[derive(Debug, Default)]
pub struct RemoteImages(HashMap<String, Arc<[u8]>>);

impl RemoteImages {
    /// The bytes of an image URL: a `data:` URL's own, or those fetched for a remote one.
    pub fn bytes(&self, url: &str) -> Result<Vec<u8>, String> {
        if !is_remote(url) {
            return super::images::from_data_url(url);
        }
        match self.0.get(url) {
            Some(bytes) => Ok(bytes.to_vec()),
            None => Err(refused()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ordinary_public_addresses_are_public() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for special in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(special.parse().unwrap()), "{special}");
        }
    }

    #[test]
    fn the_policy_checks_scheme_and_host_before_any_connection() {
        let url = |u: &str| Url::parse(u).unwrap();
        let public = ImageUrlPolicy::Public;
        assert!(public.admits(&url("https://example.com/cat.png")).is_ok());
        assert!(public.admits(&url("http://93.184.215.14/cat.png")).is_ok());
        assert!(public
            .admits(&url("http://127.0.0.1:8080/cat.png"))
            .unwrap_err()
            .contains("not a public"));
        assert!(public
            .admits(&url("http://[::1]/cat.png"))
            .unwrap_err()
            .contains("not a public"));
        assert!(public
            .admits(&url("file:///etc/passwd"))
            .unwrap_err()
            .contains("http(s)"));
        let hosts = ImageUrlPolicy::from_hosts(&["Images.Local".into(), "127.0.0.1".into()]);
        assert!(hosts.admits(&url("http://images.local/a.png")).is_ok());
        assert!(hosts.admits(&url("http://127.0.0.1:9/a.png")).is_ok());
        assert!(hosts
            .admits(&url("http://example.com/a.png"))
            .unwrap_err()
            .contains("not among"));
        assert!(ImageUrlPolicy::Refused
            .admits(&url("https://example.com/a.png"))
            .unwrap_err()
            .contains("--allow-image-urls"));
    }

    #[tokio::test]
    async fn a_refusing_fetcher_fetches_nothing_and_passes_data_urls() {
        let fetcher = ImageFetcher::default();
        let urls = vec![
            ("a".to_string(), "data:image/png;base64,aGk=".to_string()),
            ("b".to_string(), "https://example.com/cat.png".to_string()),
        ];
        let (field, err) = fetcher.fetch_all(urls).await.unwrap_err();
        assert_eq!(field, "b");
        assert!(err.contains("--allow-image-urls"), "{err}");
        let none = fetcher
            .fetch_all(vec![("a".into(), "data:;base64,aGk=".into())])
            .await
            .unwrap();
        assert_eq!(none.bytes("data:;base64,aGk=").unwrap(), b"hi");
        assert!(none
            .bytes("https://example.com/cat.png")
            .unwrap_err()
            .contains("--allow-image-urls"));
    }
}
