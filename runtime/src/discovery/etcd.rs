//! etcd discovery (DESIGN.md §2), the networked twin of `MemoryDiscovery` and the way Dynamo
//! finds workers: each worker puts `baton/{ns}/instances/{component}/{endpoint}/{lease:x}` under
//! a lease it keeps alive; the frontend's router watches the endpoint's prefix and routes to
//! whatever is there. A worker that dies stops its keep-alives, the lease expires, etcd deletes
//! the key, and the watcher's `Delete` takes the worker out of routing.
//!
//! Both halves outlive etcd outages on their own: the keep-alive task reconnects (re-granting
//! the lease, with the same id when etcd allows, if it expired meanwhile) and re-puts the key;
//! the watch task re-creates its watch and resyncs by diffing a fresh read against what it has
//! reported, so a consumer's view ends up exact without restarting anything.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseGrantOptions, PutOptions, WatchOptions,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Discovery, DiscoveryError, DiscoveryEvent, EndpointId, Instance, InstanceSpec, Registration,
    Result,
};

/// How long `connect` waits for etcd before reporting it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on any single unary request, so a hung server cannot stall a task forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on open streams (watch, keep-alive) detect a silently dead connection. etcd
/// rejects pings more often than every 5 s (`--grpc-keepalive-min-time`).
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry pacing while etcd is down; capped low so recovery follows etcd's return closely.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Discovery backed by an etcd cluster.
#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    /// The endpoints as given, comma-joined, for error messages.
    endpoints: String,
    ttl: Duration,
    /// Cancelled by `shutdown`; parent of every background task's token.
    shutdown: CancellationToken,
}

impl EtcdDiscovery {
    /// Connects and checks that etcd answers, failing within a few seconds (with the endpoints
    /// named) when it does not. `ttl` is the lease TTL of every registration (rounded up to
    /// whole seconds; etcd may raise it to its minimum, 2 s by default).
    pub async fn connect(endpoints: &[String], ttl: Duration) -> Result<Self> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(DiscoveryError::Unavailable {
                url: joined,
                reason: "no etcd endpoints given".into(),
            });
        }
        let unavailable = |reason: String| DiscoveryError::Unavailable {
            url: joined.clone(),
            reason,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT);
        // The client connects lazily, so a cheap read is what proves etcd is there.
        let probe = async {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            let probe = GetOptions::new().with_keys_only().with_limit(1);
            client.get("baton/", Some(probe)).await?;
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unavailable(describe(&e))),
            Err(_) => return Err(unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        Ok(Self {
            client,
            endpoints: joined,
            ttl,
            shutdown: CancellationToken::new(),
        })
    }

    /// Stops every keep-alive and watch task of this handle *without* revoking leases — what
    /// `kill -9` does to a worker: its instances leave discovery only when their leases expire
    /// (within the TTL). For tests and crash drills; registrations made later fail.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    fn failed(&self, op: &'static str, e: &etcd_client::Error) -> DiscoveryError {
        DiscoveryError::Etcd {
            op,
            url: self.endpoints.clone(),
            reason: describe(e),
        }
    }

    fn ttl_secs(&self) -> i64 {
        (self.ttl.as_secs_f64().ceil() as i64).max(1)
    }
}

#[async_trait]
impl Discovery for EtcdDiscovery {
    async fn register(&self, spec: InstanceSpec) -> Result<Registration> {
        if self.shutdown.is_cancelled() {
            return Err(DiscoveryError::ShutDown);
        }
        let mut client = self.client.clone();
        let grant = client
            .lease_grant(self.ttl_secs(), None)
            .await
            .map_err(|e| self.failed("lease grant", &e))?;
        let instance = Instance {
            endpoint: spec.endpoint,
            instance_id: grant.id() as u64,
            address: spec.address,
            model: spec.model,
            metadata: spec.metadata,
        };
        let keeper = Keeper {
            client,
            endpoints: self.endpoints.clone(),
            ttl_secs: grant.ttl().max(1),
            instance: instance.clone(),
            withdrawn: self.shutdown.child_token(),
            shutdown: self.shutdown.clone(),
        };
        if let Err(e) = keeper.put(grant.id()).await {
            keeper.revoke(grant.id()).await;
            return Err(self.failed("put", &e));
        }
        let withdraw = Withdraw(keeper.withdrawn.clone());
        tokio::spawn(keeper.run(grant.id()));
        Ok(Registration::new(instance, withdraw))
    }

    async fn watch(
        &self,
        endpoint: &EndpointId,
    ) -> Result<(Vec<Instance>, mpsc::UnboundedReceiver<DiscoveryEvent>)> {
        if self.shutdown.is_cancelled() {
            return Err(DiscoveryError::ShutDown);
        }
        let prefix = endpoint.prefix();
        let mut client = self.client.clone();
        let resp = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.failed("get", &e))?;
        let known = parse_instances(resp.kvs());
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut now: Vec<Instance> = known.values().cloned().collect();
        now.sort_by_key(|i| i.instance_id);
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher {
            client,
            prefix,
            tx,
            known,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watcher.run(revision + 1));
        Ok((now, rx))
    }

    async fn put_setting(&self, key: &str, value: serde_json::Value) -> Result<()> {
        let mut client = self.client.clone();
        let bytes = serde_json::to_vec(&value).expect("JSON values serialize");
        client
            .put(key, bytes, None)
            .await
            .map_err(|e| self.failed("put", &e))?;
        Ok(())
    }

    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>> {
        let mut client = self.client.clone();
        let resp = client
            .get(key, None)
            .await
            .map_err(|e| self.failed("get", &e))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        serde_json::from_slice(kv.value())
            .map(Some)
            .map_err(|e| DiscoveryError::Backend(format!("setting `{key}` is not JSON: {e}")))
    }

    async fn watch_setting(&self, key: &str) -> Result<watch::Receiver<Option<serde_json::Value>>> {
        if self.shutdown.is_cancelled() {
            return Err(DiscoveryError::ShutDown);
        }
        let mut client = self.client.clone();
        let resp = client
            .get(key, None)
            .await
            .map_err(|e| self.failed("get", &e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let (tx, rx) = watch::channel(None);
        let watcher = SettingWatcher {
            client,
            key: key.to_string(),
            tx,
            shutdown: self.shutdown.clone(),
        };
        if let Some(kv) = resp.kvs().first() {
            let v = watcher.parse(kv.value());
            watcher.tx.send_replace(v);
        }
        tokio::spawn(watcher.run(revision + 1));
        Ok(rx)
    }
}

/// Follows one setting key: read, watch from the read's revision, and read again after any
/// failure, so a restarted etcd is followed without the consumer noticing.
struct SettingWatcher {
    client: Client,
    key: String,
    tx: watch::Sender<Option<serde_json::Value>>,
    shutdown: CancellationToken,
}

impl SettingWatcher {
    fn parse(&self, value: &[u8]) -> Option<serde_json::Value> {
        match serde_json::from_slice(value) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(key = %self.key, "ignoring a setting that is not JSON: {e}");
                None
            }
        }
    }

    async fn run(self, mut from_revision: i64) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let followed = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = self.tx.closed() => return,
                f = self.follow(from_revision) => f,
            };
            if let Err(why) = followed {
                debug!(key = %self.key, "etcd setting watch lost: {why}");
            }
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                let mut client = self.client.clone();
                if let Ok(resp) = client.get(self.key.as_str(), None).await {
                    if let Some(kv) = resp.kvs().first() {
                        if let Some(v) = self.parse(kv.value()) {
                            self.tx.send_if_modified(|old| {
                                let changed = old.as_ref() != Some(&v);
                                *old = Some(v);
                                changed
                            });
                        }
                    }
                    from_revision = resp.header().map_or(0, |h| h.revision()) + 1;
                    backoff = FIRST_BACKOFF;
                    break;
                }
            }
        }
    }

    async fn follow(&self, revision: i64) -> std::result::Result<(), String> {
        let options = WatchOptions::new().with_start_revision(revision);
        let mut stream = self
            .client
            .clone()
            .watch(self.key.as_str(), Some(options))
            .await
            .map_err(|e| describe(&e))?;
        loop {
            let Some(resp) = stream.message().await.map_err(|e| describe(&e))? else {
                return Err("watch stream closed".into());
            };
            if resp.canceled() {
                return Err(format!("watch canceled by etcd ({})", resp.cancel_reason()));
            }
            for event in resp.events() {
                if event.event_type() != EventType::Put {
                    continue;
                }
                if let Some(v) = event.kv().and_then(|kv| self.parse(kv.value())) {
                    self.tx.send_replace(Some(v));
                }
            }
        }
    }
}

/// The registration's guard: dropping it tells the keep-alive task to revoke the lease.
struct Withdraw(CancellationToken);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Why a keep-alive loop ended.
enum LeaseEnd {
    /// etcd says the lease no longer exists (expired during an outage, or revoked).
    Lost,
    /// The connection failed; the lease may still be alive.
    Disconnected(String),
}

/// The background task keeping one registration alive.
struct Keeper {
    client: Client,
    endpoints: String,
    ttl_secs: i64,
    /// What is published; `instance_id` follows the current lease.
    instance: Instance,
    /// Cancelled when the `Registration` is dropped. A child of `shutdown` so that sleeps
    /// wake on either; `run` checks `shutdown` first, so a shutdown never revokes.
    withdrawn: CancellationToken,
    shutdown: CancellationToken,
}

impl Keeper {
    async fn run(mut self, mut lease: i64) {
        // Own handles, so the selects below can borrow `self` mutably.
        let (shutdown, withdrawn) = (self.shutdown.clone(), self.withdrawn.clone());
        loop {
            let end = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = withdrawn.cancelled() => return self.revoke(lease).await,
                end = self.keep_alive(lease) => end,
            };
            match end {
                LeaseEnd::Lost => warn!(lease = format!("{lease:x}"), "etcd lease lost"),
                LeaseEnd::Disconnected(why) => warn!(
                    lease = format!("{lease:x}"),
                    endpoints = %self.endpoints,
                    "etcd keep-alive failed: {why}; reconnecting"
                ),
            }
            let mut backoff = FIRST_BACKOFF;
            lease = loop {
                let attempt = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = withdrawn.cancelled() => return self.revoke(lease).await,
                    attempt = self.recover(lease) => attempt,
                };
                match attempt {
                    Ok(lease) => break lease,
                    Err(e) => {
                        let why = describe(&e);
                        debug!(endpoints = %self.endpoints, "etcd still unreachable: {why}");
                        tokio::select! {
                            _ = withdrawn.cancelled() => {}
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
        }
    }

    /// Refreshes the lease every TTL/3 until etcd stops answering or drops the lease.
    async fn keep_alive(&self, lease: i64) -> LeaseEnd {
        let period = Duration::from_secs(self.ttl_secs as u64) / 3;
        let (mut keeper, mut answers) = match self.client.clone().lease_keep_alive(lease).await {
            Ok(pair) => pair,
            // The client reports an unknown lease (TTL 0 on the first refresh) this way.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => return LeaseEnd::Lost,
            Err(e) => return LeaseEnd::Disconnected(describe(&e)),
        };
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = keeper.keep_alive().await {
                return LeaseEnd::Disconnected(describe(&e));
            }
            // An answer slower than a period means the lease is at risk: treat it as a dead
            // connection rather than wait for TCP to notice.
            match tokio::time::timeout(period, answers.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return LeaseEnd::Lost,
                Ok(Ok(None)) => return LeaseEnd::Disconnected("keep-alive stream closed".into()),
                Ok(Err(e)) => return LeaseEnd::Disconnected(describe(&e)),
                Err(_) => {
                    return LeaseEnd::Disconnected(format!("no keep-alive answer in {period:?}"))
                }
            }
        }
    }

    /// After a failure: keeps the lease if etcd still has it (making sure the key is there),
    /// otherwise grants a new one — asking for the old id first so watchers and peers keep
    /// seeing the same instance id — and puts the key again.
    async fn recover(&mut self, lease: i64) -> std::result::Result<i64, etcd_client::Error> {
        let mut client = self.client.clone();
        let alive = client.lease_time_to_live(lease, None).await?.ttl() > 0;
        if alive {
            let key = self.instance.endpoint.key(lease as u64);
            if client.get(key, None).await?.kvs().is_empty() {
                self.put(lease).await?;
            }
            info!(
                lease = format!("{lease:x}"),
                "etcd reachable again; lease kept"
            );
            return Ok(lease);
        }
        let same_id = LeaseGrantOptions::new().with_id(lease);
        let grant = match client.lease_grant(self.ttl_secs, Some(same_id)).await {
            Ok(grant) => grant,
            // The id can be taken (or refused); any fresh lease will do.
            Err(e) => {
                debug!(
                    "re-granting lease {lease:x} failed ({}); taking a new id",
                    describe(&e)
                );
                client.lease_grant(self.ttl_secs, None).await?
            }
        };
        let new = grant.id();
        self.ttl_secs = grant.ttl().max(1);
        self.instance.instance_id = new as u64;
        if let Err(e) = self.put(new).await {
            self.revoke(new).await;
            return Err(e);
        }
        if new == lease {
            info!(instance = format!("{new:x}"), "re-registered in etcd");
        } else {
            warn!(
                old = format!("{lease:x}"),
                new = format!("{new:x}"),
                "re-registered in etcd under a new instance id"
            );
        }
        Ok(new)
    }

    async fn put(&self, lease: i64) -> std::result::Result<(), etcd_client::Error> {
        let mut instance = self.instance.clone();
        instance.instance_id = lease as u64;
        // `Instance` is plain data (strings, numbers, a JSON value): encoding cannot fail.
        let value = serde_json::to_vec(&instance).unwrap_or_default();
        let key = instance.endpoint.key(lease as u64);
        self.client
            .clone()
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map(|_| ())
    }

    /// Withdraws the instance at once; if etcd is unreachable the lease simply expires.
    async fn revoke(&self, lease: i64) {
        if let Err(e) = self.client.clone().lease_revoke(lease).await {
            debug!(
                "revoking lease {lease:x} failed ({}); it will expire",
                describe(&e)
            );
        }
    }
}

/// The background task feeding one watcher.
struct Watcher {
    client: Client,
    prefix: String,
    tx: mpsc::UnboundedSender<DiscoveryEvent>,
    /// What the consumer has been told: instance id → instance.
    known: HashMap<u64, Instance>,
    shutdown: CancellationToken,
}

/// The consumer went away or discovery was shut down.
struct Stop;

impl Watcher {
    async fn run(mut self, mut from_revision: i64) {
        // Own handles, so the selects below can borrow `self` mutably.
        let (shutdown, consumer) = (self.shutdown.clone(), self.tx.clone());
        loop {
            let why = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = consumer.closed() => return,
                followed = self.follow(from_revision) => match followed {
                    Ok(Stop) => return,
                    Err(why) => why,
                },
            };
            warn!(prefix = %self.prefix, "etcd watch lost: {why}; resyncing");
            let mut backoff = FIRST_BACKOFF;
            from_revision = loop {
                let attempt = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = consumer.closed() => return,
                    attempt = self.resync() => attempt,
                };
                match attempt {
                    Ok(Some(revision)) => break revision + 1,
                    Ok(None) => return,
                    Err(e) => {
                        debug!(prefix = %self.prefix, "etcd resync failed: {}", describe(&e));
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            info!(prefix = %self.prefix, instances = self.known.len(), "etcd watch resynced");
        }
    }

    /// Streams events from `revision` on until the watch fails.
    async fn follow(&mut self, revision: i64) -> std::result::Result<Stop, String> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let mut stream = self
            .client
            .clone()
            .watch(self.prefix.as_str(), Some(options))
            .await
            .map_err(|e| describe(&e))?;
        loop {
            let Some(resp) = stream.message().await.map_err(|e| describe(&e))? else {
                return Err("watch stream closed".into());
            };
            if resp.canceled() {
                // E.g. the start revision was compacted away: the resync covers the gap.
                return Err(format!(
                    "watch canceled by etcd ({}; compacted at {})",
                    resp.cancel_reason(),
                    resp.compact_revision()
                ));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let sent = match event.event_type() {
                    EventType::Put => match registered_instance(kv) {
                        Ok((id, instance)) => self.put(id, instance),
                        Err(why) => {
                            warn!("{why}");
                            // A key that held an instance and now holds garbage: it is gone.
                            instance_id(&String::from_utf8_lossy(kv.key()))
                                .is_none_or(|id| self.delete(id))
                        }
                    },
                    EventType::Delete => match instance_id(&String::from_utf8_lossy(kv.key())) {
                        Some(id) => self.delete(id),
                        None => true,
                    },
                };
                if !sent {
                    return Ok(Stop);
                }
            }
        }
    }

    /// Reads the prefix afresh and reports the difference from `known`. Returns the read's
    /// revision (the watch resumes after it), or `None` if the consumer is gone.
    async fn resync(&mut self) -> std::result::Result<Option<i64>, etcd_client::Error> {
        let resp = self
            .client
            .clone()
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let fresh = parse_instances(resp.kvs());
        let gone: Vec<u64> = self
            .known
            .keys()
            .filter(|id| !fresh.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if !self.delete(id) {
                return Ok(None);
            }
        }
        for (id, instance) in fresh {
            if !self.put(id, instance) {
                return Ok(None);
            }
        }
        Ok(Some(resp.header().map_or(0, |h| h.revision())))
    }

    /// Reports a put unless the consumer already has exactly this instance. False if the
    /// consumer is gone.
    fn put(&mut self, id: u64, instance: Instance) -> bool {
        if self.known.get(&id) == Some(&instance) {
            return true;
        }
        self.known.insert(id, instance.clone());
        self.tx.send(DiscoveryEvent::Put(instance)).is_ok()
    }

    /// Reports a delete of an instance the consumer knows. False if the consumer is gone.
    fn delete(&mut self, id: u64) -> bool {
        if self.known.remove(&id).is_none() {
            return true;
        }
        self.tx
            .send(DiscoveryEvent::Delete { instance_id: id })
            .is_ok()
    }
}

/// The instance id in a key's last segment (`…/{instance_id:x}`).
fn instance_id(key: &str) -> Option<u64> {
    let last = key.rsplit('/').next()?;
    u64::from_str_radix(last, 16).ok()
}

/// Instances under a prefix, keyed by the id in their key; malformed entries are skipped
/// (logged) so one bad writer cannot hide every other instance.
fn parse_instances(kvs: &[etcd_client::KeyValue]) -> HashMap<u64, Instance> {
    let mut out = HashMap::new();
    for kv in kvs {
        match registered_instance(kv) {
            Ok((id, instance)) => {
                out.insert(id, instance);
            }
            Err(why) => warn!("{why}"),
        }
    }
    out
}

/// The instance a key holds, if it is one that [`EtcdDiscovery::register`] could have written:
/// the key ends in the instance id, is held by the lease of that id, and its value is an
/// instance of that id whose own key is this one. Anything else (a stray or hand-written key,
/// a value of the wrong shape) would be routed to as a worker that does not exist, or never
/// leave when its writer dies. The error says which key and why.
fn registered_instance(kv: &etcd_client::KeyValue) -> std::result::Result<(u64, Instance), String> {
    let key = String::from_utf8_lossy(kv.key());
    let ignoring = |why: String| format!("ignoring etcd key `{key}`: {why}");
    let id = instance_id(&key)
        .ok_or_else(|| ignoring("its last segment is not a hex instance id".into()))?;
    let instance: Instance = crate::dropped::decode(kv.value())
        .map_err(|e| ignoring(format!("its value is not an instance: {e}")))?;
    if instance.endpoint.key(instance.instance_id) != key {
        return Err(ignoring(format!(
            "its value describes instance {:x} of `{}`, which belongs under `{}`",
            instance.instance_id,
            instance.endpoint.prefix(),
            instance.endpoint.key(instance.instance_id)
        )));
    }
    if kv.lease() as u64 != id {
        return Err(ignoring(format!(
            "it is held by lease {:x}, not by the instance's own lease {id:x}",
            kv.lease()
        )));
    }
    Ok((id, instance))
}

/// An etcd client error with its causes: the client's own `Display` drops the inner
/// transport error ("connection refused"), which is the useful part.
fn describe(e: &etcd_client::Error) -> String {
    let mut text = e.to_string();
    let inner: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::GRpcStatus(s) => Some(s),
        _ => None,
    };
    let mut cause = inner.and_then(|i| i.source());
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_come_from_the_keys_last_segment() {
        let e = EndpointId::new("dynamo", "VllmWorker", "generate");
        assert_eq!(
            instance_id(&e.key(0x694d_9b1a_27f0_0a3c)),
            Some(0x694d_9b1a_27f0_0a3c)
        );
        assert_eq!(
            instance_id("baton/dynamo/instances/VllmWorker/generate/zz"),
            None
        );
        assert_eq!(
            instance_id("baton/dynamo/instances/VllmWorker/generate/"),
            None
        );
    }
}
