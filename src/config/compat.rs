//! `[compat]`: the URL schemes of other media proxies.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::*;

/// `[compat]`: the URL schemes of other media proxies, each off until configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompatConfig {
    /// GitHub camo / go-camo key: enables `/camo/…`.
    #[serde(serialize_with = "redact_str")]
    pub camo_key: String,
    /// Akkoma/Pleroma `media_proxy` secret (the instance's `secret_key_base`): enables
    /// `/proxy/<sig>/<url>/<filename>`.
    #[serde(serialize_with = "redact_str")]
    pub akkoma_secret: String,
    /// The variant `/proxy/preview/…` serves.
    pub akkoma_preview_variant: String,
    /// Token for Akkoma's cache invalidation: `PURGE` of an Akkoma URL on the public port,
    /// with `Authorization: Bearer <token>`, drops the file and its renditions. Empty: off
    /// (405).
    #[serde(serialize_with = "redact_str")]
    pub purge_token: String,
    /// Misskey's unsigned `/proxy/<name>.webp?url=…`.
    pub misskey: bool,
    /// Origin fills per source origin (a registrable domain, an IPv4 /24, an IPv6 /56) per
    /// minute through the unsigned Misskey route; beyond it, 503 (cached objects are still
    /// served).
    pub misskey_fills_per_minute: u32,
    /// Address of the pict-rs API for Lemmy (`/image/original?proxy=`, `/image/process.<ext>`,
    /// `/image/details/original`): unsigned, so an internal address only Lemmy (or the nginx
    /// in front of pict-rs) reaches, never the public one. Unset: off. An address that is not
    /// loopback or private (`0.0.0.0` included) is refused unless `pictrs_secret` is set.
    pub pictrs_listen: Option<SocketAddr>,
    /// Largest `thumbnail=N` the pict-rs API renders; larger asks are fitted to it.
    pub pictrs_max_thumbnail: u32,
    /// When set, every request on the pict-rs listener must carry it as
    /// `X-Parasol-Secret` (the nginx in front of pict-rs adds it); others get 403. At least
    /// 32 bytes.
    #[serde(serialize_with = "redact_str")]
    pub pictrs_secret: String,
    /// Origin fills per source origin per minute through the pict-rs API (Lemmy fetches every
    /// image of a post as it arrives); beyond it, 503.
    pub pictrs_fills_per_minute: u32,
    /// Origin fills per minute through the unsigned routes (Misskey, pict-rs) all together,
    /// whatever their origins: many origins cannot add up to more.
    pub unsigned_fills_per_minute: u32,
}

impl Default for CompatConfig {
    fn default() -> Self {
        Self {
            camo_key: String::new(),
            akkoma_secret: String::new(),
            akkoma_preview_variant: "akkoma".into(),
            purge_token: String::new(),
            misskey: false,
            misskey_fills_per_minute: 120,
            pictrs_listen: None,
            pictrs_max_thumbnail: 2048,
            pictrs_secret: String::new(),
            pictrs_fills_per_minute: 600,
            unsigned_fills_per_minute: 1200,
        }
    }
}

impl CompatConfig {
    /// Checked against `variants`, one of which the Akkoma preview names.
    pub(super) fn check(
        &self,
        variants: &std::collections::BTreeMap<String, VariantConfig>,
    ) -> Result<(), ConfigError> {
        // A short key lets anyone make parasol fetch (camo), purge (the token), or fetch
        // through the unsigned pict-rs API.
        for (key, secret) in [
            ("compat.camo_key", &self.camo_key),
            ("compat.akkoma_secret", &self.akkoma_secret),
            ("compat.purge_token", &self.purge_token),
            ("compat.pictrs_secret", &self.pictrs_secret),
        ] {
            check_secret(key, secret)?;
        }
        if !self.akkoma_secret.is_empty() && !variants.contains_key(&self.akkoma_preview_variant) {
            let v = &self.akkoma_preview_variant;
            return bad(
                "compat.akkoma_preview_variant",
                format!("{v:?} is not a configured variant"),
            );
        }
        if self.pictrs_listen.is_some() && !(16..=8192).contains(&self.pictrs_max_thumbnail) {
            return bad("compat.pictrs_max_thumbnail", "must be 16-8192");
        }
        // Unsigned: anyone who reaches it makes parasol fetch. Never on a public address
        // without a secret only the nginx in front knows.
        if let Some(addr) = self.pictrs_listen {
            if !internal_address(addr.ip()) && self.pictrs_secret.is_empty() {
                return bad(
                    "compat.pictrs_listen",
                    format!(
                        "{addr} is not a loopback or private address: the pict-rs API is \
                         unsigned; listen on an internal address or set compat.pictrs_secret"
                    ),
                );
            }
        }
        if self.misskey_fills_per_minute == 0
            || self.pictrs_fills_per_minute == 0
            || self.unsigned_fills_per_minute == 0
        {
            return bad(
                "compat",
                "misskey_fills_per_minute, pictrs_fills_per_minute and \
                 unsigned_fills_per_minute must be above zero",
            );
        }
        Ok(())
    }
}
