//! The URL schemes parasol answers, each turning a request path into one [`ProxyRequest`].
//!
//! Every scheme verifies its signature before decoding anything else, and all schemes reduce a
//! source to the same canonical URL, so one file reached through two schemes is one cache entry.

pub mod akkoma;
pub mod camo;
pub mod misskey;
pub mod native;
pub mod pictrs;
pub mod rate;
pub mod upstream;

use url::Url;

use crate::cache::Key;
use crate::error::ProxyError;

/// Longest source URL accepted; longer ones are refused before parsing.
pub const MAX_SOURCE_LEN: usize = 4096;

/// A verified request for one source, in one rendition.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    /// The canonical source URL ([`parse_source`]).
    pub source: Url,
    /// A configured variant name, or `None` for the original.
    pub variant: Option<String>,
    /// The URL the cache key is made of (`[[policy.normalize]]` applied to `source`):
    /// computed once, the first time it is asked for, and shared with the requests made
    /// from this one (its original, a newer URL of the same entry), so a request's key,
    /// URL bans and allowance all see one string.
    cache_url: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl PartialEq for ProxyRequest {
    fn eq(&self, other: &Self) -> bool {
        (&self.source, &self.variant) == (&other.source, &other.variant)
    }
}

impl Eq for ProxyRequest {}

impl ProxyRequest {
    /// A request for `source` (canonical: from [`parse_source`]) as `variant`.
    pub fn new(source: Url, variant: Option<String>) -> Self {
        Self { source, variant, cache_url: Default::default() }
    }

    /// The same source's original.
    pub fn original(&self) -> Self {
        Self { variant: None, ..self.clone() }
    }

    /// The same cache entry under another URL (`source`: one the normaliser makes the same
    /// key of, a newer signature of it, say).
    pub fn respelled(&self, source: Url) -> Self {
        Self { source, ..self.clone() }
    }

    /// The URL the cache key is made of: the source as `normalizer` makes it
    /// (`[[policy.normalize]]`: a re-signed CDN URL is the same entry).
    pub fn cache_url(&self, normalizer: &crate::policy::Normalizer) -> &str {
        self.cache_url.get_or_init(|| normalizer.cache_url(&self.source).into_owned())
    }

    /// The cache key: [`Self::cache_url`] and the variant.
    pub fn key(&self, normalizer: &crate::policy::Normalizer) -> Key {
        Key::new(self.cache_url(normalizer), self.variant.as_deref())
    }
}

/// Parses and canonicalises a source URL: http(s) only, a host, no credentials, no fragment.
///
/// Every spelling of one resource becomes one URL, before the cache key, bans, the domain
/// policy or an allowance see it: scheme and host in lowercase (IDNA to punycode), no default
/// port, dot segments resolved (also spelt `%2e`), by the `url` crate (WHATWG); then escapes of
/// unreserved characters decoded (`%61` is `a`, `%2E` in a name is `.`), the rest in
/// uppercase hex (`%2f` is `%2F`), and an empty query dropped (RFC 3986, 6.2.2). A host name
/// over 253 bytes, or with a label over 63, is refused: no DNS name is that long.
pub fn parse_source(text: &str) -> Result<Url, ProxyError> {
    if text.len() > MAX_SOURCE_LEN {
        return Err(ProxyError::BadUrl("source URL too long"));
    }
    let mut url = Url::parse(text).map_err(|_| ProxyError::BadUrl("source is not a URL"))?;
    crate::fetch::check_form(&url)?;
    let host = url.host_str().unwrap_or_default();
    if host.is_empty() {
        return Err(ProxyError::BadUrl("source URL has no host"));
    }
    let name = host.trim_end_matches('.');
    if name.len() > 253 || name.split('.').any(|label| label.len() > 63) {
        return Err(ProxyError::BadUrl("source host name too long"));
    }
    // `x.test.` is `x.test` (the root's label, which DNS adds anyway).
    if name.len() != host.len() {
        let name = name.to_string();
        url.set_host(Some(&name)).map_err(|_| ProxyError::BadUrl("source URL has no host"))?;
    }
    url.set_fragment(None);
    if let Some(path) = canonical_escapes(url.path()) {
        url.set_path(&path);
    }
    match url.query() {
        Some("") => url.set_query(None),
        Some(query) => {
            if let Some(query) = canonical_escapes(query) {
                url.set_query(Some(&query));
            }
        }
        None => {}
    }
    Ok(url)
}

/// `text` with escapes of unreserved characters decoded and the others in uppercase hex;
/// `None` when it has nothing to change (most URLs: no allocation).
fn canonical_escapes(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut escapes = memchr::memchr_iter(b'%', bytes).peekable();
    escapes.peek()?;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut changed = false;
    for i in escapes {
        if i < at {
            continue;
        }
        let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else { continue };
        let (Some(hv), Some(lv)) = (hex(h), hex(l)) else { continue };
        out.push_str(&text[at..i]);
        let byte = hv << 4 | lv;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
            changed = true;
        } else {
            out.push('%');
            out.push(h.to_ascii_uppercase() as char);
            out.push(l.to_ascii_uppercase() as char);
            changed |= h.is_ascii_lowercase() || l.is_ascii_lowercase();
        }
        at = i + 3;
    }
    out.push_str(&text[at..]);
    changed.then_some(out)
}

/// `Content-Disposition: inline` with a file name, its extension corrected to what is served
/// (`x.png` as WebP is `x.png.webp`, as Misskey names it; Akkoma's `preview` is `preview.jpg`), with an ASCII fallback
/// and the exact name as `filename*` when they differ.
pub fn content_disposition(filename: &str, served_type: &str) -> String {
    let ext = match served_type {
        "image/jpeg" => "jpg",
        "image/vnd.microsoft.icon" => "ico",
        "image/svg+xml" => "svg",
        "video/quicktime" => "mov",
        other => other.rsplit('/').next().unwrap_or("unknown"),
    };
    let ext = ext.trim_start_matches("x-");
    let lower = filename.to_ascii_lowercase();
    let same = lower.ends_with(&format!(".{ext}"))
        || (ext == "jpg" && lower.ends_with(".jpeg"))
        || (ext == "tiff" && lower.ends_with(".tif"));
    let name = if same { filename.to_string() } else { format!("{filename}.{ext}") };
    let ascii: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' })
        .collect();
    if ascii == name {
        format!("inline; filename=\"{name}\"")
    } else {
        let exact: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        format!("inline; filename=\"{ascii}\"; filename*=UTF-8''{}", exact.replace('+', "%20"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sources() {
        let u = parse_source("HTTPS://Media.Example.TEST:443/a/../cat.jpg#frag").unwrap();
        assert_eq!(u.as_str(), "https://media.example.test/cat.jpg");
        // Every spelling of one resource is one URL.
        for spelling in [
            "https://media.example.test/system/a.png",
            "https://media.example.test/system/%61.png",
            "https://media.example.test/system/a%2Epng",
            "https://media.example.test/system/a%2epng",
            "https://MEDIA.example.test:443/system/./a.png",
            "https://media.example.test/system/x/%2e%2E/a.png",
            "https://media.example.test/system/a.png?",
            "https://media.example.test/%73ystem/a.png#top",
            "https://media.example.test./system/a.png",
        ] {
            let u = parse_source(spelling).unwrap();
            assert_eq!(u.as_str(), "https://media.example.test/system/a.png", "{spelling}");
        }
        // Other escapes stay escapes, in uppercase; so does the query's.
        let u = parse_source("http://x.test/a%2fb%20c.png?k=%7e%2f&l").unwrap();
        assert_eq!(u.as_str(), "http://x.test/a%2Fb%20c.png?k=~%2F&l");
        assert_eq!(parse_source("http://x.test/%zz%").unwrap().as_str(), "http://x.test/%zz%");
        let long = format!("https://{}.test/a", "a".repeat(64));
        assert!(parse_source(&long).is_err(), "a label over 63 bytes");
        let long = format!("https://{}test/a", "abcdefghi.".repeat(26));
        assert!(parse_source(&long).is_err(), "a name over 253 bytes");
        assert!(parse_source("ftp://x.test/a").is_err());
        assert!(parse_source("file:///etc/passwd").is_err());
        assert!(parse_source("https://user:pw@x.test/a").is_err());
        assert!(parse_source("javascript:alert(1)").is_err());
        assert!(parse_source(&format!("https://x.test/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn disposition_names_what_is_served() {
        assert_eq!(content_disposition("a.png", "image/webp"), "inline; filename=\"a.png.webp\"");
        assert_eq!(content_disposition("a.webp", "image/webp"), "inline; filename=\"a.webp\"");
        assert_eq!(content_disposition("a.JPEG", "image/jpeg"), "inline; filename=\"a.JPEG\"");
        assert_eq!(
            content_disposition("a b.png", "image/png"),
            "inline; filename=\"a_b.png\"; filename*=UTF-8''a%20b.png"
        );
    }
}
