//! Origin-pull (`[[upstream]]`): parasol in front of an instance's own media bucket, where an
//! nginx cache would stand (Mastodon's `S3_ALIAS_HOST`, GoToSocial's
//! `storage-s3-redirect-url`). A request under a configured path prefix names a file of one
//! fixed origin; nothing else can be reached through it, so it needs no signature.
//!
//! The source URL (the cache key) is the origin's URL of the file. For an S3 bucket read with
//! credentials that is the object's unsigned URL; each fetch signs it afresh
//! ([`Upstreams::fetch_url`]), so the key never holds a signature and no credential leaves the
//! process except as a short-lived signed query.

use std::sync::Arc;
use std::time::Duration;

use object_store::signer::Signer;
use url::Url;

use crate::config::UpstreamConfig;
use crate::error::ProxyError;

/// How long a signed request to a bucket stays valid: one fetch, with its redirects.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// The configured upstreams, in the order they are matched.
#[derive(Debug, Default)]
pub struct Upstreams {
    entries: Vec<Upstream>,
}

#[derive(Debug)]
struct Upstream {
    prefix: String,
    /// Lowercase; empty: any host.
    host: String,
    /// The origin's URL of the path just under the prefix (ends with `/`).
    base: Url,
    /// Signs fetches of objects under `base`.
    bucket: Option<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    store: Arc<object_store::aws::AmazonS3>,
    /// Object names are `key_prefix` + the path below the upstream's prefix.
    key_prefix: String,
}

impl Upstreams {
    /// Builds the entries of a checked configuration.
    pub async fn new(configs: &[UpstreamConfig]) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(configs.len());
        for (i, u) in configs.iter().enumerate() {
            u.check().map_err(|e| format!("upstream[{i}]: {e}"))?;
            let (base, bucket) = match &u.s3 {
                None => {
                    let mut base = Url::parse(&u.origin).map_err(|e| e.to_string())?;
                    if !base.path().ends_with('/') {
                        base.set_path(&format!("{}/", base.path()));
                    }
                    (base, None)
                }
                Some(s3) => {
                    let region = if s3.region.is_empty() { "us-east-1" } else { &s3.region };
                    let store = object_store::aws::AmazonS3Builder::new()
                        .with_endpoint(&s3.endpoint)
                        .with_allow_http(s3.endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(s3.virtual_hosted_style)
                        .with_bucket_name(&s3.bucket)
                        .with_region(region)
                        .with_access_key_id(&s3.access_key_id)
                        .with_secret_access_key(&s3.secret_access_key)
                        .build()
                        .map_err(|e| format!("upstream[{i}].s3: {e}"))?;
                    let bucket =
                        Bucket { store: Arc::new(store), key_prefix: s3.key_prefix.clone() };
                    // The object URL of the key prefix itself, unsigned: the base of sources.
                    let mut base =
                        bucket.sign("_").await.map_err(|e| format!("upstream[{i}].s3: {e}"))?;
                    base.set_query(None);
                    let path = base.path().trim_end_matches('_').to_string();
                    base.set_path(&path);
                    (base, Some(bucket))
                }
            };
            entries.push(Upstream {
                prefix: u.prefix.clone(),
                host: u.host.to_ascii_lowercase(),
                base,
                bucket,
            });
        }
        Ok(Self { entries })
    }

    /// Whether no `[[upstream]]` is configured (routing skips them all).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The source a request names, when an upstream takes it: entries with a `host` only
    /// for that host (`named_only`: only those), others for any.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        named_only: bool,
    ) -> Option<Result<Url, ProxyError>> {
        let host = host.map(|h| strip_port(h).to_ascii_lowercase());
        let entry = self.entries.iter().find(|e| {
            let host_ok = match e.host.is_empty() {
                true => !named_only,
                false => host.as_deref() == Some(e.host.as_str()),
            };
            host_ok && path.starts_with(&e.prefix)
        })?;
        Some(entry.source(&path[entry.prefix.len()..]))
    }

    /// The URL to request for `source`: a freshly signed one when it is an object of a bucket
    /// read with credentials, else `None` (the source itself).
    pub async fn fetch_url(&self, source: &Url) -> Result<Option<Url>, ProxyError> {
        let source_text = source.as_str();
        for entry in &self.entries {
            let Some(bucket) = &entry.bucket else { continue };
            let Some(rest) = source_text.strip_prefix(entry.base.as_str()) else { continue };
            return bucket.sign(rest).await.map(Some).map_err(|e| {
                tracing::error!(error = %e, "cannot sign a request to an upstream bucket");
                ProxyError::internal("cannot sign the upstream request")
            });
        }
        Ok(None)
    }
}

impl Upstream {
    /// The origin's URL of `rest` (the path after the prefix, as the viewer sent it,
    /// percent-encoded): never anything outside `base`. Made from the object key `rest`
    /// names, decoded and escaped again one way (every byte but the unreserved ones), so every
    /// spelling of one object (`a.png`, `%61.png`, `a%2Epng`) is one source and one fetch.
    fn source(&self, rest: &str) -> Result<Url, ProxyError> {
        let refused = || Err(ProxyError::BadUrl("not a file path"));
        if rest.is_empty() || rest.ends_with('/') || rest.len() > crate::api::MAX_SOURCE_LEN {
            return refused();
        }
        let mut canonical = String::with_capacity(rest.len());
        for segment in rest.split('/') {
            let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
            let bad = decoded.is_empty()
                || decoded == b"."
                || decoded == b".."
                || decoded.iter().any(|b| matches!(b, b'/' | b'\\' | b'?' | b'#') || *b < 0x20);
            if bad {
                return refused();
            }
            if !canonical.is_empty() {
                canonical.push('/');
            }
            canonical.extend(percent_encoding::percent_encode(&decoded, OBJECT_KEY));
        }
        let url = self.base.join(&canonical).map_err(|_| ProxyError::BadUrl("not a file path"))?;
        match url.as_str().starts_with(self.base.as_str()) && url.query().is_none() {
            true => Ok(url),
            false => refused(),
        }
    }
}

impl Bucket {
    /// A signed GET of the object `key_prefix` + `rest` (`rest` percent-encoded).
    async fn sign(&self, rest: &str) -> Result<Url, object_store::Error> {
        let prefix: String =
            percent_encoding::utf8_percent_encode(&self.key_prefix, PATH).to_string();
        let path = object_store::path::Path::from_url_path(format!("{prefix}{rest}"))?;
        self.store.signed_url(http::Method::GET, &path, SIGNED_FOR).await
    }
}

/// Bytes of an object key escaped in its source URL: the ones the `url` crate escapes in a
/// path, and `%` (a literal one): the source is then what [`crate::api::parse_source`] makes of
/// the object's URL written plainly, so a URL ban or purge of it names this very entry.
const OBJECT_KEY: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Characters of a key prefix escaped before it is read as a URL path.
const PATH: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b' ').add(b'%').add(b'?').add(b'#');

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(']') => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(prefix: &str, host: &str, origin: &str) -> Upstreams {
        let config = UpstreamConfig {
            prefix: prefix.into(),
            host: host.into(),
            origin: origin.into(),
            s3: None,
        };
        futures_util::FutureExt::now_or_never(Upstreams::new(&[config])).unwrap().unwrap()
    }

    #[test]
    fn paths_map_below_the_origin_and_nowhere_else() {
        let u = upstreams("/system/", "", "https://bucket.example.test/mastodon");
        let ok =
            |path: &str| u.route(Some("media.test"), path, false).unwrap().unwrap().to_string();
        assert_eq!(
            ok("/system/media_attachments/files/1/original/a.png"),
            "https://bucket.example.test/mastodon/media_attachments/files/1/original/a.png"
        );
        assert_eq!(ok("/system/a%20b.png"), "https://bucket.example.test/mastodon/a%20b.png");
        // One object, one source, however its key is spelt.
        for spelling in ["/system/a.png", "/system/%61.png", "/system/a%2Epng", "/system/a%2epng"] {
            assert_eq!(ok(spelling), "https://bucket.example.test/mastodon/a.png", "{spelling}");
        }
        assert_eq!(ok("/system/(1)%2B.png"), "https://bucket.example.test/mastodon/(1)+.png");
        // The same object as parse_source spells its URL.
        for path in [
            "/system/(1)%2B.png",
            "/system/a%20b.png",
            "/system/%C3%A9t%C3%A9.png",
            "/system/x%25y.png",
        ] {
            let source = ok(path);
            assert_eq!(crate::api::parse_source(&source).unwrap().as_str(), source, "{path}");
        }
        assert!(u.route(None, "/other/a.png", false).is_none(), "outside the prefix");
        for bad in [
            "/system/../x.png",
            "/system/a/%2e%2E/x.png",
            "/system/a/%2fetc",
            "/system/a//b.png",
            "/system/",
            "/system/dir/",
            "/system/a%5c..%5cb",
            "/system/./a.png",
        ] {
            assert!(u.route(None, bad, false).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_named_host_takes_only_its_own_requests() {
        let u = upstreams("/", "Media.Example.Test", "http://files.example.test/");
        assert!(u.route(Some("media.example.test:8080"), "/a.png", true).is_some());
        assert!(u.route(Some("other.test"), "/a.png", true).is_none());
        assert!(u.route(None, "/a.png", false).is_none());
    }

    #[test]
    fn settings_are_checked() {
        let base = UpstreamConfig {
            prefix: "/s/".into(),
            origin: "https://b.test/".into(),
            ..Default::default()
        };
        assert!(base.check().is_ok());
        for bad in [
            UpstreamConfig { prefix: "s/".into(), ..base.clone() },
            UpstreamConfig { prefix: "/s".into(), ..base.clone() },
            UpstreamConfig { prefix: "/a/../".into(), ..base.clone() },
            UpstreamConfig { origin: "ftp://b.test/".into(), ..base.clone() },
            UpstreamConfig { origin: "https://u:p@b.test/".into(), ..base.clone() },
            UpstreamConfig { origin: "https://b.test/?x=1".into(), ..base.clone() },
            UpstreamConfig { origin: String::new(), ..base.clone() },
            UpstreamConfig { s3: Some(Default::default()), ..base.clone() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
