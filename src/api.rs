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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    /// The canonical source URL (parsed by the `url` crate, fragment removed).
    pub source: Url,
    /// A configured variant name, or `None` for the original.
    pub variant: Option<String>,
}

impl ProxyRequest {
    /// The cache key: the source as `normalizer` makes it (`[[policy.normalize]]`: a
    /// re-signed CDN URL is the same entry), and the variant.
    pub fn key(&self, normalizer: &crate::policy::Normalizer) -> Key {
        Key::new(&normalizer.cache_url(&self.source), self.variant.as_deref())
    }
}

/// Parses and canonicalises a source URL: http(s) only, a host, no credentials, no fragment.
pub fn parse_source(text: &str) -> Result<Url, ProxyError> {
    if text.len() > MAX_SOURCE_LEN {
        return Err(ProxyError::BadUrl("source URL too long"));
    }
    let mut url = Url::parse(text).map_err(|_| ProxyError::BadUrl("source is not a URL"))?;
    crate::fetch::check_form(&url)?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ProxyError::BadUrl("source URL has no host"));
    }
    url.set_fragment(None);
    Ok(url)
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
