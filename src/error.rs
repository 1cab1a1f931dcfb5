//! The one error type at the proxy's boundary: every failure maps to a status, a stable code
//! (for logs, metrics and operators' alerts) and the party that caused it.
//!
//! Messages shown to viewers are fixed strings: they never contain the origin URL, a resolved
//! address or an internal path, because an error page is served on the instance's own domain.

use http::StatusCode;

/// Who caused a failure; decides the log level and whether it is worth remembering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The request was malformed, unsigned or not allowed.
    Viewer,
    /// The origin failed, lied or sent something we refuse to serve.
    Origin,
    /// parasol itself failed (disk, overload, a bug).
    Us,
}

impl Cause {
    /// The cause as a label (`viewer`, `origin`, `us`).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Viewer => "viewer",
            Cause::Origin => "origin",
            Cause::Us => "us",
        }
    }
}

/// Every way a request can fail, each with a status ([`ProxyError::status`]), a stable code
/// ([`ProxyError::code`]) and who caused it ([`ProxyError::cause`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The request's URL does not parse (why, in fixed words).
    #[error("malformed proxy URL: {0}")]
    BadUrl(&'static str),
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// No preset has that name.
    #[error("unknown variant")]
    UnknownVariant,
    /// No route takes this path.
    #[error("no such route")]
    NoRoute,
    /// The request target is longer than parasol reads.
    #[error("request target too long")]
    UriTooLong,
    /// Only GET and HEAD (and Akkoma's PURGE) are answered.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The origin's address may not be dialed (why: loopback, private, ...).
    #[error("destination refused: {0}")]
    BlockedDestination(&'static str),
    /// The source is not an http(s) URL without credentials.
    #[error("URL refused: {0}")]
    RefusedUrl(&'static str),
    /// The domain policy refuses the origin.
    #[error("domain blocked by policy")]
    BlockedDomain,
    /// A moderation rule refuses it (which rule).
    #[error("banned by moderation: {0}")]
    Banned(&'static str),
    /// The scanner could not be asked, and `moderation.scanner_fail` is closed.
    #[error("scanner unavailable")]
    ScannerUnavailable,
    /// A redirect led to a refused destination.
    #[error("origin redirected to a refused destination")]
    RedirectRefused,
    /// A redirect led from https to plain http.
    #[error("origin redirected from https to plain http")]
    InsecureRedirect,
    /// The origin answered 404 or 410.
    #[error("origin answered not found")]
    NotFound,
    /// Larger than `cache.max_object_bytes`.
    #[error("object larger than the configured limit")]
    TooLarge,
    /// The bytes are not of an allowed type.
    #[error("content type not allowed")]
    UnsupportedType,
    /// A decoder refused the file (why).
    #[error("image cannot be rendered: {0}")]
    BadImage(std::sync::Arc<str>),
    /// The preset has nothing to show for this file: a Misskey flag on something that is not
    /// a picture, a badge whose mask is empty.
    #[error("no rendition: {0}")]
    NoRendition(std::sync::Arc<str>),
    /// A worker ran out of CPU time or memory on the file, or died (why).
    #[error("media work over its limits: {0}")]
    MediaTooCostly(std::sync::Arc<str>),
    /// The file's site had files too costly to render three times in ten minutes: no new
    /// media jobs of it for a while. Not the file's own verdict.
    #[error("media of this site refused for a while")]
    MediaOriginRefused,
    /// No media worker within `media.queue_wait`, or the queue (or the origin's share of it)
    /// is full.
    #[error("media workers busy")]
    MediaBusy,
    /// The origin answered with this status.
    #[error("origin answered status {0}")]
    OriginStatus(u16),
    /// The origin's response cannot be used (why).
    #[error("origin response invalid: {0}")]
    OriginInvalid(&'static str),
    /// The origin could not be reached.
    #[error("origin unreachable")]
    OriginUnreachable,
    /// The origin's TLS was refused (why).
    #[error("origin's TLS refused: {0}")]
    OriginTls(&'static str),
    /// The origin did not answer in time.
    #[error("origin timed out")]
    OriginTimeout,
    /// Too many fills or connections at once.
    #[error("overloaded")]
    Overloaded,
    /// The origin asked parasol to wait (`Retry-After`), or keeps failing: no new fills from
    /// it until then.
    #[error("origin backing off")]
    OriginBackoff,
    /// Its origin rule's `fetches_per_second` has no turn free before the fill's deadline.
    #[error("origin paced")]
    OriginPaced,
    /// The source URL's signature expired (its normalize rule's `expiry_param` has passed),
    /// and no fresher URL of the file is known.
    #[error("source URL expired")]
    SourceExpired,
    /// The disk is full.
    #[error("cache storage full")]
    StorageFull,
    /// A fault of parasol's own (the detail goes to the log only).
    #[error("internal error: {0}")]
    Internal(std::sync::Arc<str>),
}

impl ProxyError {
    /// Wraps a local failure (disk, index). The detail goes to the log, never to the viewer.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ProxyError::Internal(e.to_string().into())
    }

    /// A decoder's refusal of a file (unreadable, over the limits read from its header).
    pub fn bad_image(why: &str) -> Self {
        ProxyError::BadImage(why.into())
    }

    /// A failure of our own storage: a full disk is `StorageFull` (503, evicts to make room),
    /// anything else internal.
    pub fn storage(e: std::io::Error) -> ProxyError {
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            ProxyError::StorageFull
        } else {
            ProxyError::internal(e)
        }
    }

    /// The HTTP status a viewer gets.
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            BadUrl(_) => StatusCode::BAD_REQUEST,
            BadSignature
            | BlockedDestination(_)
            | BlockedDomain
            | RedirectRefused
            | RefusedUrl(_) => StatusCode::FORBIDDEN,
            UnknownVariant | NoRoute | NotFound | NoRendition(_) | SourceExpired => {
                StatusCode::NOT_FOUND
            }
            Banned(_) => StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            UriTooLong => StatusCode::URI_TOO_LONG,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedType | BadImage(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MediaTooCostly(_) | MediaOriginRefused => StatusCode::UNPROCESSABLE_ENTITY,
            OriginStatus(_) | OriginInvalid(_) | OriginUnreachable | InsecureRedirect
            | OriginTls(_) => StatusCode::BAD_GATEWAY,
            OriginTimeout => StatusCode::GATEWAY_TIMEOUT,
            Overloaded | StorageFull | MediaBusy | ScannerUnavailable | OriginBackoff
            | OriginPaced => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable code: safe to alert on, never reworded.
    pub fn code(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadUrl(_) => "bad_url",
            BadSignature => "bad_signature",
            UnknownVariant => "unknown_variant",
            NoRoute => "no_route",
            UriTooLong => "uri_too_long",
            MethodNotAllowed => "method_not_allowed",
            BlockedDestination(_) => "blocked_destination",
            RefusedUrl(_) => "refused_url",
            BlockedDomain => "blocked_domain",
            Banned(_) => "banned",
            ScannerUnavailable => "scanner_unavailable",
            RedirectRefused => "redirect_refused",
            InsecureRedirect => "insecure_redirect",
            NotFound => "origin_not_found",
            TooLarge => "too_large",
            UnsupportedType => "unsupported_type",
            BadImage(_) => "bad_image",
            NoRendition(_) => "no_rendition",
            MediaTooCostly(_) => "media_too_costly",
            MediaOriginRefused => "media_origin_refused",
            MediaBusy => "media_busy",
            OriginStatus(_) => "origin_status",
            OriginInvalid(_) => "origin_invalid",
            OriginUnreachable => "origin_unreachable",
            OriginTls(_) => "origin_tls",
            OriginTimeout => "origin_timeout",
            Overloaded => "overloaded",
            OriginBackoff => "origin_backoff",
            OriginPaced => "origin_paced",
            SourceExpired => "source_expired",
            StorageFull => "storage_full",
            Internal(_) => "internal",
        }
    }

    /// Who caused it.
    pub fn cause(&self) -> Cause {
        use ProxyError::*;
        match self {
            BadUrl(_) | BadSignature | UnknownVariant | NoRoute | UriTooLong => Cause::Viewer,
            MethodNotAllowed => Cause::Viewer,
            BlockedDestination(_) | BlockedDomain | RefusedUrl(_) => Cause::Viewer,
            // The URL the viewer holds has expired: not the origin's failure.
            SourceExpired => Cause::Viewer,
            // Parasol's own restraint toward the origin: tried again once it is over.
            OriginBackoff | OriginPaced => Cause::Us,
            NotFound | TooLarge | UnsupportedType | BadImage(_) | NoRendition(_)
            | OriginStatus(_) | OriginInvalid(_) | RedirectRefused | InsecureRedirect => {
                Cause::Origin
            }
            // The file did it: a decoder ran out of time or memory on it, or died.
            MediaTooCostly(_) | MediaOriginRefused => Cause::Origin,
            OriginUnreachable | OriginTimeout | OriginTls(_) => Cause::Origin,
            Banned(_) | Overloaded | StorageFull | MediaBusy | ScannerUnavailable | Internal(_) => {
                Cause::Us
            }
        }
    }

    /// The text a viewer sees: fixed per kind, free of URLs, addresses and internal detail.
    pub fn public_message(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadUrl(why) => why,
            BadSignature => "bad signature",
            UnknownVariant => "unknown variant",
            NoRoute => "not found",
            UriTooLong => "request target too long",
            MethodNotAllowed => "only GET and HEAD are allowed",
            BlockedDestination(_) => "destination not allowed",
            RefusedUrl(_) => "only http and https URLs without credentials",
            BlockedDomain => "domain blocked by this server's policy",
            Banned(_) => "not available on this server",
            RedirectRefused => "destination not allowed",
            NotFound => "not found at origin",
            TooLarge => "object too large",
            UnsupportedType => "content type not allowed",
            BadImage(_) => "image cannot be rendered",
            NoRendition(_) => "no such rendition of this file",
            MediaTooCostly(_) => "image too costly to render",
            MediaOriginRefused => "images of this site are refused for a while",
            OriginStatus(_) | OriginInvalid(_) | OriginUnreachable | InsecureRedirect
            | OriginTls(_) => "origin failed",
            OriginTimeout => "origin timed out",
            Overloaded | StorageFull | MediaBusy | ScannerUnavailable => {
                "overloaded, try again later"
            }
            OriginBackoff | OriginPaced => "origin asked to wait, try again later",
            SourceExpired => "source URL expired",
            Internal(_) => "internal error",
        }
    }

    /// What a viewer is told. Every way a destination could not be used (refused before
    /// connecting because of its address, name or port; no answer; a TLS handshake that
    /// failed; a refused redirect) is one answer, 502 `origin_unreachable`: otherwise the
    /// difference between "resolves to a private address", "refuses connections" and "no
    /// such name" would let anyone map a network through parasol. The detail stays in the
    /// log, the audit log and `parasol_origin_fetches_total`.
    pub fn to_viewer(&self) -> ProxyError {
        use ProxyError::*;
        match self {
            BlockedDestination(_)
            | RedirectRefused
            | OriginUnreachable
            | OriginTls(_)
            | InsecureRedirect => OriginUnreachable,
            other => other.clone(),
        }
    }

    /// Whether this failure is remembered in the negative cache: only what the origin did, so
    /// a dead origin is not asked again by every viewer, while our own faults are retried.
    pub fn is_negative_cacheable(&self) -> bool {
        // A file refused by a ban is remembered like an origin failure (`cache.negative_ttl`),
        // so each view of its URL does not download it again to find out; a lifted ban thus
        // applies to such a URL within that time.
        self.cause() == Cause::Origin || matches!(self, ProxyError::Banned(_))
    }
}
