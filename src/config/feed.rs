//! `[[feed]]`: the instances' timelines parasol follows, to fetch media when a post arrives
//! rather than when someone looks ([`crate::feed`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// Which API a feed speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedKind {
    /// Misskey's streaming API (`globalTimeline`), caught up with `notes/global-timeline`.
    Misskey,
    /// The Mastodon API's `public:remote` stream (Mastodon, Akkoma, Pleroma, GoToSocial),
    /// caught up with `/api/v1/timelines/public?remote=true`.
    Mastodon,
}

/// One `[[feed]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// `misskey` or `mastodon`.
    pub kind: FeedKind,
    /// The instance's base URL (`https://misskey.example`). A secret in logs and
    /// `check-config`: it tells which instance this parasol serves.
    #[serde(serialize_with = "redact_str")]
    pub url: String,
    /// An access token of an account that may read the federated timeline (redacted
    /// wherever the configuration is shown).
    #[serde(default, serialize_with = "redact_str")]
    pub token: String,
    /// Each file of an arriving post is fetched at a moment drawn uniformly within this long
    /// after the post arrived.
    #[serde(default = "default_delay")]
    pub delay: Dur,
}

fn default_delay() -> Dur {
    Dur(Duration::from_secs(300))
}

impl FeedConfig {
    /// What is wrong with it, as `feed[i]`'s complaint (never quoting the URL or token).
    pub(super) fn check(&self) -> Result<(), String> {
        if http_url("url", &self.url).is_err() {
            return Err("url: must be the instance's http(s) base URL (value not shown)".into());
        }
        if self.delay.0 > Duration::from_secs(86_400) {
            return Err("delay: at most 24h".into());
        }
        Ok(())
    }
}
