//! The last check before a request byte is written: the address the socket actually connected
//! to must pass the [`Guard`].
//!
//! The resolver and the URL check already refuse bad destinations; this layer catches whatever
//! slips past them (a resolver bug, a reqwest path that skips the resolver), because it looks at
//! the connected socket itself. It is a tower layer on reqwest's connector, reading the peer
//! address hyper-util records in [`HttpInfo`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connection, HttpInfo};

use super::guard::Guard;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps the connector service with [`PeerCheck`].
#[derive(Clone)]
pub struct PeerCheckLayer {
    /// What the connected address must pass.
    pub guard: Arc<Guard>,
}

impl<S> tower_layer::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck { inner, guard: self.guard.clone() }
    }
}

/// A connection whose peer address was checked after connecting.
#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S, R> tower_service::Service<R> for PeerCheck<S>
where
    S: tower_service::Service<R, Error = BoxError>,
    S::Response: Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let connecting = self.inner.call(req);
        let guard = self.guard.clone();
        Box::pin(async move {
            let conn = connecting.await?;
            let mut extensions = http::Extensions::new();
            conn.connected().get_extras(&mut extensions);
            match extensions.get::<HttpInfo>() {
                Some(info) => guard.check_peer(info.remote_addr())?,
                // No peer address means we cannot prove the destination is allowed.
                None => {
                    let addr = std::net::Ipv4Addr::UNSPECIFIED.into();
                    Err(super::guard::Refused { addr, reason: "connected peer unknown" })?
                }
            }
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use tower_layer::Layer;
    use tower_service::Service;

    /// hyper-util's plain connector with its error boxed, as reqwest's connector stack has it.
    #[derive(Clone)]
    struct Boxed(HttpConnector);

    impl Service<http::Uri> for Boxed {
        type Response = <HttpConnector as Service<http::Uri>>::Response;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.0.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, uri: http::Uri) -> Self::Future {
            let fut = self.0.call(uri);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }
    }

    /// The resolver is bypassed entirely here (an IP literal, a bare connector): the layer alone
    /// must refuse the connected loopback peer, and admit it once allowed.
    #[tokio::test]
    async fn refuses_a_connected_peer_outside_the_guard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.10:0").await.unwrap();
        let uri: http::Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let layer =
            |allow: Vec<ipnet::IpNet>| PeerCheckLayer { guard: Arc::new(Guard::new(allow)) };

        let mut refusing = layer(vec![]).layer(Boxed(HttpConnector::new()));
        let Err(err) = refusing.call(uri.clone()).await else { panic!("connected peer admitted") };
        assert!(err.downcast_ref::<super::super::guard::Refused>().is_some(), "{err}");

        let mut allowing =
            layer(vec!["127.0.0.10/32".parse().unwrap()]).layer(Boxed(HttpConnector::new()));
        assert!(allowing.call(uri).await.is_ok());
    }
}
