//! The media URLs of an arriving post that a viewer's browser would then ask parasol for, as
//! requests: a URL the instance hands out in one of parasol's own forms (native, Akkoma,
//! camo, Misskey's `mediaProxy`) names exactly the file and rendition to warm; any other is
//! a remote file whose original is warmed.

use serde_json::Value;

use crate::api::ProxyRequest;

/// Fields of a Mastodon API status that hold media URLs (mastodon/mastodon
/// `app/serializers/rest/status_serializer.rb`, `media_attachment_serializer.rb`,
/// `account_serializer.rb`, `custom_emoji_serializer.rb`, `preview_card_serializer.rb`).
pub fn mastodon_status(status: &Value, out: &mut Vec<String>) {
    for m in array(&status["media_attachments"]) {
        // `url` is what the instance serves (its copy, or a proxied form); `remote_url` the
        // origin's. A viewer asks for `url` and `preview_url`.
        push(out, &m["url"]);
        push(out, &m["preview_url"]);
    }
    let account = &status["account"];
    for key in ["avatar", "avatar_static", "header", "header_static"] {
        push(out, &account[key]);
    }
    for e in array(&status["emojis"]).chain(array(&account["emojis"])) {
        push(out, &e["url"]);
        push(out, &e["static_url"]);
    }
    push(out, &status["card"]["image"]);
    images_in_html(status["content"].as_str().unwrap_or_default(), out);
    if status["reblog"].is_object() {
        mastodon_status(&status["reblog"], out);
    }
}

/// Fields of a Misskey note that hold media URLs (misskey-dev/misskey
/// `packages/backend/src/core/entities/NoteEntityService.ts`, `DriveFileEntityService.ts`,
/// `UserEntityService.ts`).
pub fn misskey_note(note: &Value, out: &mut Vec<String>) {
    for f in array(&note["files"]) {
        push(out, &f["url"]);
        push(out, &f["thumbnailUrl"]);
    }
    let user = &note["user"];
    push(out, &user["avatarUrl"]);
    push(out, &user["bannerUrl"]);
    // Emoji as a map of name → URL (or, in older versions, a list of {name, url}).
    for emojis in [&note["emojis"], &note["reactionEmojis"], &user["emojis"]] {
        match emojis {
            Value::Object(map) => map.values().for_each(|v| push(out, v)),
            Value::Array(list) => list.iter().for_each(|e| push(out, &e["url"])),
            _ => {}
        }
    }
    if note["renote"].is_object() {
        misskey_note(&note["renote"], out);
    }
}

fn array(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn push(out: &mut Vec<String>, v: &Value) {
    if let Some(url) = v.as_str().filter(|u| u.starts_with("http://") || u.starts_with("https://"))
    {
        if !out.iter().any(|u| u == url) {
            out.push(url.to_string());
        }
    }
}

/// The `src` of every `<img>` in a post's HTML body (attribute quoted with `"` or `'`).
fn images_in_html(html: &str, out: &mut Vec<String>) {
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(start) = lower[at..].find("<img") {
        let tag_start = at + start;
        let tag_end = lower[tag_start..].find('>').map_or(lower.len(), |e| tag_start + e);
        let tag = &lower[tag_start..tag_end];
        if let Some(src) = tag.find(" src=") {
            let value_start = tag_start + src + 5;
            let quote = html.as_bytes().get(value_start).copied();
            if let Some(q @ (b'"' | b'\'')) = quote {
                let rest = &html[value_start + 1..tag_end];
                if let Some(end) = rest.find(q as char) {
                    let url = rest[..end].replace("&amp;", "&");
                    push(out, &Value::String(url));
                }
            }
        }
        at = tag_end;
    }
}

/// What to warm for `url`: the request one of parasol's own URL forms names (when `url` is
/// on parasol's public host), or the original of a remote file.
pub fn request_for(url: &str, ours: &Ours) -> Option<ProxyRequest> {
    let parsed = url::Url::parse(url).ok()?;
    if ours.is_ours(&parsed) {
        return ours.parse(&parsed);
    }
    let source = crate::api::parse_source(url).ok()?;
    Some(ProxyRequest::new(source, None))
}

/// parasol's own public address and URL forms, to read the URLs an instance hands out.
pub struct Ours {
    /// `server.public_base_url`'s host and port.
    host: Option<(String, Option<u16>)>,
    signer: crate::signing::Signer,
    compat: crate::config::CompatConfig,
}

impl Ours {
    /// parasol as `config` describes it, verifying native URLs with `signer`.
    pub fn new(config: &crate::config::Config, signer: crate::signing::Signer) -> Self {
        let base = &config.server.public_base_url;
        let host = base.host_str().map(|h| (h.to_ascii_lowercase(), base.port_or_known_default()));
        Self { host, signer, compat: config.compat.clone() }
    }

    fn is_ours(&self, url: &url::Url) -> bool {
        let here = url.host_str().map(|h| (h.to_ascii_lowercase(), url.port_or_known_default()));
        here.is_some() && here == self.host
    }

    /// The request a URL of ours names, by the forms the public listener routes.
    fn parse(&self, url: &url::Url) -> Option<ProxyRequest> {
        use crate::api;
        let (path, query) = (url.path(), url.query());
        if path.starts_with(api::native::PREFIX) {
            return api::native::parse(path, &self.signer).ok();
        }
        if path.starts_with(api::camo::PREFIX) && !self.compat.camo_key.is_empty() {
            return api::camo::parse(path, query, self.compat.camo_key.as_bytes()).ok();
        }
        if path.starts_with(api::akkoma::PREFIX) && !self.compat.akkoma_secret.is_empty() {
            let (key, preview) =
                (self.compat.akkoma_secret.as_bytes(), &self.compat.akkoma_preview_variant);
            return match api::akkoma::parse(path, key, preview).ok()? {
                api::akkoma::Parsed::Request(r) => Some(r),
                _ => None,
            };
        }
        if self.compat.misskey && api::misskey::matches(path, query) {
            return api::misskey::parse(path, query).ok().map(|m| m.request);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_media_url_of_a_status_and_a_note_is_found_once() {
        let status = serde_json::json!({
            "content": "<p>look <img src=\"https://a.test/inline.png?x=1&amp;y=2\" alt=''></p>",
            "media_attachments": [{"url": "https://a.test/1.jpg", "preview_url": "https://a.test/1s.jpg",
                                   "remote_url": "https://origin.test/1.jpg"}],
            "account": {"avatar": "https://a.test/av.png", "avatar_static": "https://a.test/av.png",
                        "header": "https://a.test/h.png", "header_static": "https://a.test/hs.png",
                        "emojis": [{"url": "https://a.test/e1.png", "static_url": "https://a.test/e1s.png"}]},
            "emojis": [],
            "card": {"image": "https://a.test/card.jpg"},
            "reblog": {"media_attachments": [{"url": "https://b.test/2.mp4", "preview_url": null}],
                       "account": {"avatar": "https://b.test/av.png"}}
        });
        let mut urls = Vec::new();
        mastodon_status(&status, &mut urls);
        assert_eq!(
            urls,
            [
                "https://a.test/1.jpg",
                "https://a.test/1s.jpg",
                "https://a.test/av.png",
                "https://a.test/h.png",
                "https://a.test/hs.png",
                "https://a.test/e1.png",
                "https://a.test/e1s.png",
                "https://a.test/card.jpg",
                "https://a.test/inline.png?x=1&y=2",
                "https://b.test/2.mp4",
                "https://b.test/av.png",
            ]
        );
        let note = serde_json::json!({
            "files": [{"url": "https://m.test/f.webp", "thumbnailUrl": "https://m.test/t.webp"}],
            "user": {"avatarUrl": "https://m.test/a.webp", "emojis": {"blob": "https://m.test/blob.png"}},
            "emojis": {"x": "https://m.test/x.png"},
            "reactionEmojis": {"y@r.test": "https://r.test/y.png"},
            "renote": {"files": [], "user": {"avatarUrl": "javascript:alert(1)"}}
        });
        let mut urls = Vec::new();
        misskey_note(&note, &mut urls);
        assert_eq!(
            urls,
            [
                "https://m.test/f.webp",
                "https://m.test/t.webp",
                "https://m.test/a.webp",
                "https://m.test/x.png",
                "https://r.test/y.png",
                "https://m.test/blob.png",
            ]
        );
    }
}
