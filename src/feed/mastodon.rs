//! The Mastodon API's public remote timeline (Mastodon, Akkoma, Pleroma, GoToSocial): the
//! streaming API's `public:remote` channel as server-sent events at
//! `/api/v1/streaming/public/remote` (events `event: update` with a Status as JSON in `data:`,
//! `:` comment lines as heartbeats), caught up after a reconnection with
//! `GET /api/v1/timelines/public?remote=true&since_id=…` (newest first, at most 40). The token
//! goes in an `Authorization: Bearer` header, never in a URL. Shapes from mastodon/mastodon
//! `streaming/index.js` (`streamToHttp`: `event: NAME\ndata: JSON\n\n`, heartbeats `:)` and
//! `:thump` every 15 s as single comment lines), `app/services/fan_out_on_write_service.rb`
//! (event `update`, payload the REST Status; boosts are not on public streams),
//! `app/controllers/api/v1/timelines/public_controller.rb` and `concerns/paginable.rb`.

use futures_util::StreamExt;

use super::{Feeds, Shape, Timeline, extract};
use crate::config::FeedConfig;

/// Statuses asked for per catch-up page (the API's maximum).
const PAGE: usize = 40;
/// Pages read at most in one catch-up: beyond it, what is older is let go.
const MAX_PAGES: usize = 10;
/// A stream silent this long (no event, no heartbeat) is taken for lost.
const SILENCE: std::time::Duration = std::time::Duration::from_secs(90);

/// The first whole event in `buffer` (its name and data, or `None` for a comment or an
/// event without data) and how many bytes follow it; `None` while no event is whole.
fn next_event(buffer: &[u8]) -> Option<(Option<(String, String)>, usize)> {
    let text = std::str::from_utf8(buffer).ok().or_else(|| {
        // A chunk may end inside a character: read up to the last whole one.
        let valid = std::str::from_utf8(buffer).err()?.valid_up_to();
        std::str::from_utf8(&buffer[..valid]).ok()
    })?;
    let normal = |t: &str| t.find("\n\n").map(|i| (i, 2));
    let crlf = |t: &str| t.find("\r\n\r\n").map(|i| (i, 4));
    let (end, sep) = match (normal(text), crlf(text)) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let block = &text[..end];
    let mut name = String::from("message");
    let mut data = Vec::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    let event = (!data.is_empty()).then(|| (name, data.join("\n")));
    Some((event, buffer.len() - (end + sep)))
}

/// A status as the Mastodon API writes it: the public remote stream and timeline carry only
/// remote ones.
const STATUS: Shape =
    Shape { created: "created_at", media: extract::mastodon_status, remote: |_| true };

/// A status arrived on the stream (`data`, its JSON).
async fn received(feeds: &Feeds, feed: &FeedConfig, data: &str, newest: &mut Option<String>) {
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(status) => feeds.received(feed, &STATUS, &status, newest, true).await,
        Err(_) => feeds.metrics.event("bad"),
    }
}

/// The Mastodon API as a timeline a feed follows (its stream, its catch-up).
pub struct Api;

impl Timeline for Api {
    /// Reads the stream until it ends; `newest` follows the newest status id seen, and `attempt`
    /// starts again once the stream answers.
    async fn stream(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        newest: &mut Option<String>,
        attempt: &mut u32,
    ) -> Result<(), String> {
        let url = format!("{base}/api/v1/streaming/public/remote");
        let mut request = feeds.client.get(url).header("accept", "text/event-stream");
        if !feed.token.is_empty() {
            request = request.bearer_auth(&feed.token);
        }
        let response = request.send().await.map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("the streaming API answered {}", response.status()));
        }
        *attempt = 0;
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(SILENCE, body.next()).await {
                Err(_) => return Err("no event or heartbeat for 90 s".into()),
                Ok(None) => return Ok(()),
                Ok(Some(chunk)) => chunk.map_err(|e| e.without_url().to_string())?,
            };
            buffer.extend_from_slice(&chunk);
            if buffer.len() > 4 << 20 {
                return Err("an event over 4 MiB".into());
            }
            while let Some((event, rest)) = next_event(&buffer) {
                if let Some((name, data)) = event {
                    if name == "update" {
                        received(feeds, feed, &data, newest).await;
                    }
                }
                buffer.drain(..buffer.len() - rest);
            }
        }
    }

    /// Reads what arrived since `since` (page by page, newest first, at most `MAX_PAGES`), queues
    /// its media, and answers the newest id seen.
    async fn catch_up(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        since: &str,
    ) -> Result<Option<String>, String> {
        let mut newest = Some(since.to_string());
        let mut max_id: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![("remote", "true".to_string()), ("since_id", since.to_string())];
            query.push(("limit", PAGE.to_string()));
            if let Some(max) = &max_id {
                query.push(("max_id", max.clone()));
            }
            let mut request =
                feeds.client.get(format!("{base}/api/v1/timelines/public")).query(&query);
            if !feed.token.is_empty() {
                request = request.bearer_auth(&feed.token);
            }
            let response = request.send().await.map_err(|e| e.without_url().to_string())?;
            if !response.status().is_success() {
                return Err(format!("the timeline answered {}", response.status()));
            }
            let bytes = response.bytes().await.map_err(|e| e.without_url().to_string())?;
            let page: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
                .map_err(|e| format!("not a list of statuses: {e}"))?;
            for status in &page {
                feeds.received(feed, &STATUS, status, &mut newest, false).await;
            }
            // Newest first: the next page is older than this one's last.
            match page.last().and_then(|s| s["id"].as_str()) {
                Some(oldest) if page.len() == PAGE => max_id = Some(oldest.to_string()),
                _ => break,
            }
        }
        Ok(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_whole_comments_skipped_and_crlf_understood() {
        let text = b":thump\n\nevent: update\ndata: {\"id\":\"1\"}\n\nevent: delete\r\ndata: 7\r\n\r\nevent: upd";
        let (first, rest) = next_event(text).unwrap();
        assert!(first.is_none(), "a heartbeat");
        let text = &text[text.len() - rest..];
        let (second, rest) = next_event(text).unwrap();
        assert_eq!(second, Some(("update".into(), "{\"id\":\"1\"}".into())));
        let text = &text[text.len() - rest..];
        let (third, rest) = next_event(text).unwrap();
        assert_eq!(third, Some(("delete".into(), "7".into())));
        assert!(next_event(&text[text.len() - rest..]).is_none(), "not whole yet");
    }

    #[test]
    fn the_newest_id_is_the_largest_snowflake() {
        let mut newest = None;
        for id in ["109", "1100", "999", "1099"] {
            crate::feed::keep_newer(&mut newest, Some(id));
        }
        assert_eq!(newest.as_deref(), Some("1100"));
    }
}
