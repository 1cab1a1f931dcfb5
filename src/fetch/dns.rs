//! Name lookups for origins, asynchronous: hickory's resolver instead of `getaddrinfo` on the
//! blocking thread pool, where a lookup could not be cancelled and a slow resolver could fill
//! the pool that disk writes also need.
//!
//! - **Deadline**: every lookup ends within `fetch.dns_timeout`, answer or not.
//! - **Bounded**: at most `MAX_LOOKUPS` run at once; more wait (within the same deadline).
//! - **Where**: the nameservers of `/etc/resolv.conf` (and `/etc/hosts`), or
//!   `fetch.nameservers` when set.
//!
//! Every address a lookup returns is still checked by the guard before it is dialled.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use tokio::sync::Semaphore;

use super::guard::Lookup;
use crate::config::FetchConfig;

/// Lookups in flight at once.
const MAX_LOOKUPS: usize = 256;

/// The resolver parasol uses unless a test or an embedding program brings its own.
pub struct DnsLookup {
    resolver: TokioResolver,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl DnsLookup {
    /// A resolver asking `config`'s nameservers (or the system's), within its deadline.
    pub fn new(config: &FetchConfig) -> io::Result<Self> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                io::Error::other(format!("cannot read the system's resolver configuration: {e}"))
            })?
        } else {
            let ips: Vec<IpAddr> = config.nameservers.iter().map(|a| a.ip()).collect();
            let port = config.nameservers[0].port();
            let group = NameServerConfigGroup::from_ips_clear(&ips, port, true);
            let resolver = ResolverConfig::from_parts(None, vec![], group);
            TokioResolver::builder_with_config(resolver, provider)
        };
        let options = builder.options_mut();
        // Two tries within the deadline; the resolver's own cache spares repeated questions.
        options.timeout = config.dns_timeout.0 / 2;
        options.attempts = 2;
        Ok(Self {
            resolver: builder.build(),
            slots: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            timeout: config.dns_timeout.0,
        })
    }
}

impl Lookup for DnsLookup {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<Vec<IpAddr>>> + Send>> {
        let (resolver, slots, timeout) = (self.resolver.clone(), self.slots.clone(), self.timeout);
        let host = host.to_string();
        Box::pin(async move {
            let looked_up = tokio::time::timeout(timeout, async {
                let _slot = slots.acquire_owned().await.map_err(io::Error::other)?;
                resolver.lookup_ip(host.as_str()).await.map_err(io::Error::other)
            })
            .await;
            match looked_up {
                Ok(Ok(found)) => Ok(found.iter().collect()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out")),
            }
        })
    }
}
