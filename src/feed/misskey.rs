//! Misskey's global timeline: the streaming API over a WebSocket at `/streaming?i=TOKEN`, the
//! `globalTimeline` channel connected with `{"type":"connect","body":{"channel":
//! "globalTimeline","id":…}}`, notes arriving as `{"type":"channel","body":{"id":…,"type":
//! "note","body":<Note>}}`; caught up after a reconnection with `POST /api/notes/global-timeline`
//! (`{"i", "sinceId", "limit"}`, oldest first after `sinceId`). Misskey's ids sort by time as
//! strings of one length. The global timeline carries local notes too: only remote ones
//! (`user.host` set) are warmed. Shapes from misskey-dev/misskey
//! `packages/backend/src/server/api/stream/Connection.ts`, `stream/channel.ts`,
//! `stream/channels/global-timeline.ts`, `endpoints/notes/global-timeline.ts`,
//! `core/QueryService.ts` (`makePaginationQuery`: ascending with `sinceId` alone).

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{Feeds, Shape, Timeline, extract};
use crate::config::FeedConfig;

/// The id parasol's channel connection goes by.
const CHANNEL_ID: &str = "parasol-arrivals";
/// Notes asked for per catch-up page (the endpoint's maximum).
const PAGE: usize = 100;
/// Pages read at most in one catch-up.
const MAX_PAGES: usize = 10;
/// A socket silent this long is taken for lost (Misskey's clients ping; parasol pings too).
const SILENCE: std::time::Duration = std::time::Duration::from_secs(90);
/// How often parasol pings a quiet socket.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The streaming URL of `base` (`ws` for `http`, `wss` for `https`) with the token.
fn streaming_url(base: &str, token: &str) -> Result<String, String> {
    let mut url = url::Url::parse(base).map_err(|_| "not a URL".to_string())?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| "cannot make a WebSocket URL".to_string())?;
    url.set_path(&format!("{}/streaming", url.path().trim_end_matches('/')));
    if !token.is_empty() {
        url.query_pairs_mut().append_pair("i", token);
    }
    Ok(url.into())
}

/// A token never reaches a log line, even inside an error's text.
fn redact(text: &str) -> String {
    match text.find("i=") {
        Some(at) => format!("{}i=<redacted>", &text[..at]),
        None => text.to_string(),
    }
}

async fn received(
    feeds: &Feeds,
    feed: &FeedConfig,
    note: &serde_json::Value,
    newest: &mut Option<String>,
) {
    match note.is_object() {
        true => feeds.received(feed, &NOTE, note, newest, true).await,
        false => feeds.metrics.event("bad"),
    }
}

/// A note as Misskey writes it. The global timeline carries local notes too (`user.host`
/// null, and not a renote of a remote one): their files are the instance's own.
const NOTE: Shape = Shape {
    created: "createdAt",
    media: extract::misskey_note,
    remote: |note| !(note["user"]["host"].is_null() && note["renote"]["user"]["host"].is_null()),
};

/// Misskey's streaming API as a timeline a feed follows (its stream, its catch-up).
pub struct Api;

impl Timeline for Api {
    async fn stream(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        newest: &mut Option<String>,
        attempt: &mut u32,
    ) -> Result<(), String> {
        let url = streaming_url(base, &feed.token)?;
        // The error's text never includes the URL (it holds the token).
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("cannot open the streaming socket: {}", redact(&e.to_string())))?;
        let connect = serde_json::json!({
            "type": "connect",
            "body": { "channel": "globalTimeline", "id": CHANNEL_ID, "params": {} }
        });
        socket.send(Message::text(connect.to_string())).await.map_err(|e| e.to_string())?;
        *attempt = 0;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                m = socket.next() => m,
                _ = tokio::time::sleep(PING_EVERY) => {
                    if last_heard.elapsed() > SILENCE {
                        return Err("silent for 90 s".into());
                    }
                    socket.send(Message::Ping(Vec::new().into())).await.map_err(|e| e.to_string())?;
                    continue;
                }
            };
            last_heard = tokio::time::Instant::now();
            let text = match message {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                feeds.metrics.event("bad");
                continue;
            };
            let body = &value["body"];
            if value["type"] == "channel" && body["id"] == CHANNEL_ID && body["type"] == "note" {
                received(feeds, feed, &body["body"], newest).await;
            }
        }
    }

    /// Reads what arrived since `since`, page by page (at most `MAX_PAGES`), queues its media, and
    /// answers the newest id seen.
    async fn catch_up(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        since: &str,
    ) -> Result<Option<String>, String> {
        let mut newest = Some(since.to_string());
        let mut after = since.to_string();
        for _ in 0..MAX_PAGES {
            let mut body = serde_json::json!({ "sinceId": after, "limit": PAGE });
            if !feed.token.is_empty() {
                body["i"] = feed.token.clone().into();
            }
            let response = feeds
                .client
                .post(format!("{base}/api/notes/global-timeline"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !response.status().is_success() {
                return Err(format!("the timeline answered {}", response.status()));
            }
            let bytes = response.bytes().await.map_err(|e| e.without_url().to_string())?;
            let page: Vec<serde_json::Value> =
                serde_json::from_slice(&bytes).map_err(|e| format!("not a list of notes: {e}"))?;
            for note in &page {
                feeds.received(feed, &NOTE, note, &mut newest, false).await;
            }
            // The next page starts after the newest note of this one, whatever order it came in.
            match newest.clone() {
                Some(n) if page.len() == PAGE && n != after => after = n,
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
    fn the_streaming_url_carries_the_token_and_errors_do_not() {
        assert_eq!(
            streaming_url("https://misskey.test", "tok en").unwrap(),
            "wss://misskey.test/streaming?i=tok+en"
        );
        assert_eq!(
            streaming_url("http://127.0.0.2:3000/", "").unwrap(),
            "ws://127.0.0.2:3000/streaming"
        );
        let said = redact("HTTP error: 401 for ws://m.test/streaming?i=secret-token");
        assert!(!said.contains("secret-token"), "{said}");
    }
}
