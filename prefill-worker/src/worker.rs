//! The queue consumer: pull, claim, prefill, transfer, notify, ack — one job at a time per
//! worker. A claim is answered with a grant: the generation every KV write of the job presents
//! (the decode worker's fence refuses it once the claim ends) and the token its completion
//! notice carries. Decode workers' KV descriptors come from discovery (their instances' `kv_transfer`
//! metadata); a connection to each is opened once and kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::Request;
use kv_transfer::{connect_with, BackendChoice, KvDescriptor, KvTransfer};
use runtime::discovery::{decode_worker_endpoint, DiscoveryEvent, Instance};
use runtime::dropped::DropWarnings;
use runtime::protocol::{
    ClaimGrant, NoticeReply, PrefillNotice, RemotePrefillRequest, KV_TRANSFER_KEY,
};
use runtime::request_plane::RequestPlane;
use runtime::work_queue::{Job, WorkQueue};
use runtime::Planes;

static MALFORMED_JOBS: DropWarnings = DropWarnings::new("a malformed prefill job");
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::host::PrefillHost;

/// Counts a claimed job until its handling ends (acked, or dropped with the task).
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A notice that gets no answer within this is treated as refused.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct PrefillOptions {
    /// Which of a decode worker's KV endpoints to write through.
    pub backend: BackendChoice,
    /// Verifies decode workers' TLS KV servers; when set, TCP writes go only over TLS.
    pub tls: Option<Arc<kv_transfer::tls::ClientConfig>>,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            tls: None,
        }
    }
}

/// How long a decode worker whose KV endpoint could not be opened is left alone before the
/// next try (its jobs go back to the queue for other prefill workers meanwhile).
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// The decode workers discovery knows, open transfers to them, and those this worker could
/// not reach (since when, and why).
#[derive(Default)]
struct Directory {
    instances: HashMap<u64, Instance>,
    transfers: HashMap<u64, Arc<dyn KvTransfer>>,
    unreachable: HashMap<u64, (Instant, String)>,
}

pub struct PrefillWorker {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    host: Arc<PrefillHost>,
    /// Jobs claimed and not yet acknowledged (0 or 1: one job at a time).
    held: Arc<AtomicUsize>,
}

impl PrefillWorker {
    /// Starts consuming `planes`' prefill queue with `host`'s engine.
    pub async fn start(
        host: PrefillHost,
        planes: &Planes,
        options: PrefillOptions,
    ) -> Result<Self, runtime::discovery::DiscoveryError> {
        let directory = Arc::new(Mutex::new(Directory::default()));
        let (now, mut changes) = planes
            .discovery
            .watch(&decode_worker_endpoint(&planes.settings.namespace))
            .await?;
        {
            let mut d = directory.lock().unwrap_or_else(|e| e.into_inner());
            for i in now {
                d.instances.insert(i.instance_id, i);
            }
        }
        let stop = CancellationToken::new();
        let watcher = {
            let directory = directory.clone();
            tokio::spawn(async move {
                while let Some(event) = changes.recv().await {
                    let mut d = directory.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
                        DiscoveryEvent::Put(i) => {
                            d.transfers.remove(&i.instance_id);
                            // A new record may carry a new address: worth another try.
                            d.unreachable.remove(&i.instance_id);
                            d.instances.insert(i.instance_id, i);
                        }
                        DiscoveryEvent::Delete { instance_id } => {
                            d.instances.remove(&instance_id);
                            d.transfers.remove(&instance_id);
                            d.unreachable.remove(&instance_id);
                        }
                    }
                }
            })
        };
        let host = Arc::new(host);
        let held = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer {
            held: held.clone(),
            host: host.clone(),
            queue: planes.prefill_queue.clone(),
            plane: planes.requests.clone(),
            directory,
            options,
        };
        let consumer = tokio::spawn(consumer.run(stop.clone()));
        Ok(Self {
            stop,
            tasks: vec![watcher, consumer],
            host,
            held,
        })
    }

    /// Jobs this worker has claimed and not yet acknowledged: what a crash now would leave
    /// to redelivery or the decode worker's timeout.
    pub fn jobs_held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// KV blocks its engine holds for requests (0 between jobs, unless one leaked).
    pub fn kv_blocks_used(&self) -> usize {
        self.host.kv_blocks_used()
    }

    /// Stops pulling; a job in progress is dropped unacknowledged (it is delivered again).
    pub fn stop(self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
        self.host.shutdown();
    }
}

struct Consumer {
    held: Arc<AtomicUsize>,
    host: Arc<PrefillHost>,
    queue: Arc<dyn WorkQueue>,
    plane: Arc<dyn RequestPlane>,
    directory: Arc<Mutex<Directory>>,
    options: PrefillOptions,
}

impl Consumer {
    async fn run(self, stop: CancellationToken) {
        loop {
            let job = tokio::select! {
                _ = stop.cancelled() => return,
                job = self.queue.next() => job,
            };
            match job {
                Ok(Some(job)) => self.handle(job).await,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("prefill queue: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn handle(&self, job: Job) {
        let request: RemotePrefillRequest = match runtime::dropped::decode(&job.payload) {
            Ok(r) => r,
            Err(e) => {
                // Rate-limited: anyone who can publish on the queue could flood the log.
                MALFORMED_JOBS.warn(e);
                let _ = job.ack().await;
                return;
            }
        };
        let id = request.request_id.clone();
        if self.is_unreachable(request.decode_instance) {
            // Not claimed: another prefill worker that reaches it may take the job (or the
            // decode worker prefills it after its timeout). The pause keeps a lone worker
            // from spinning on the same job.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = job.nak().await;
            return;
        }
        let claim = PrefillNotice::Claim {
            request_id: id.clone(),
            delivery: job.delivery,
        };
        let grant = match self.notify(&request.notice_address, &claim).await {
            Ok(NoticeReply {
                accepted: true,
                grant: Some(grant),
                ..
            }) => grant,
            Ok(reply) => {
                tracing::debug!(request = %id, reason = ?reply.reason, "job dropped: not wanted");
                let _ = job.ack().await;
                return;
            }
            Err(e) => {
                tracing::debug!(request = %id, "job dropped: its decode worker is gone ({e})");
                let _ = job.ack().await;
                return;
            }
        };
        tracing::info!(request = %id, delivery = job.delivery, generation = grant.generation, "claimed a prefill job");
        self.held.fetch_add(1, Ordering::AcqRel);
        let _held = Held(&self.held);
        let notice = match self.run_job(&request, &grant).await {
            Ok(done) => done,
            Err(reason) => {
                tracing::warn!(request = %id, "remote prefill failed: {reason}");
                PrefillNotice::Failed {
                    request_id: id.clone(),
                    token: grant.token.clone(),
                    reason,
                }
            }
        };
        if let Err(e) = self.notify(&request.notice_address, &notice).await {
            tracing::debug!(request = %id, "decode worker did not take the notice: {e}");
        }
        // After the notice: a crash before this line gets the job delivered again.
        if let Err(e) = job.ack().await {
            tracing::warn!(request = %id, "cannot ack the prefill job: {e}");
        }
        // Operators (and the fault tests) pair this with the claim: between the two lines the
        // worker holds the job.
        tracing::info!(request = %id, "finished a prefill job");
    }

    /// Prefill and transfer; the notice to send, or why it failed.
    async fn run_job(
        &self,
        request: &RemotePrefillRequest,
        grant: &ClaimGrant,
    ) -> Result<PrefillNotice, String> {
        let transfer = self.transfer_to(request.decode_instance).await?;
        let from = request.cached_block_count;
        if from > request.dst_block_ids.len() {
            return Err(format!(
                "{from} cached blocks of a prompt with {} blocks",
                request.dst_block_ids.len()
            ));
        }
        let prefilled = self
            .host
            .prefill(
                Request {
                    request_id: request.request_id.clone(),
                    prompt_token_ids: request.token_ids.clone(),
                    params: request.sampling.clone(),
                },
                from,
            )
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let bytes = transfer
            .write_blocks(
                grant.generation,
                &request.dst_block_ids[from..],
                &prefilled.blocks,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(PrefillNotice::Done {
            request_id: request.request_id.clone(),
            token: grant.token.clone(),
            first_token: prefilled.first.token,
            logprob: prefilled.first.logprob,
            top_logprobs: prefilled.first.top_logprobs,
            backend: transfer.backend().to_string(),
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The open transfer to decode worker `instance`, opened on first use.
    async fn transfer_to(&self, instance: u64) -> Result<Arc<dyn KvTransfer>, String> {
        let descriptor = {
            let d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = d.transfers.get(&instance) {
                return Ok(t.clone());
            }
            let Some(i) = d.instances.get(&instance) else {
                return Err(format!("decode worker {instance:x} is not in discovery"));
            };
            let Some(value) = i.metadata.get(KV_TRANSFER_KEY) else {
                return Err(format!(
                    "decode worker {instance:x} publishes no KV descriptor (not disaggregated)"
                ));
            };
            serde_json::from_value::<KvDescriptor>(value.clone())
                .map_err(|e| format!("decode worker {instance:x}'s KV descriptor: {e}"))?
        };
        let transfer: Arc<dyn KvTransfer> = match connect_with(
            &descriptor,
            self.host.layout(),
            self.options.backend,
            self.options.tls.clone(),
        )
        .await
        {
            Ok(t) => t.into(),
            Err(e) => {
                let offered: Vec<String> = descriptor
                    .endpoints
                    .iter()
                    .map(|e| format!("{}={}", e.backend, e.address))
                    .collect();
                // Once per decode worker (until it re-registers or the pause ends): a
                // wrong `--kv-host` would otherwise fail every job with the same words.
                tracing::error!(
                    decode = format!("{instance:x}"),
                    endpoints = ?offered,
                    "cannot open a KV transfer to this decode worker ({e}); its jobs are left \
                     to other prefill workers for {UNREACHABLE_FOR:?} (is its --kv-host an \
                     address this host can reach?)"
                );
                self.directory
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unreachable
                    .insert(instance, (Instant::now(), e.to_string()));
                return Err(e.to_string());
            }
        };
        tracing::info!(
            decode = format!("{instance:x}"),
            backend = %transfer.backend(),
            "KV transfer open"
        );
        self.directory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .transfers
            .insert(instance, transfer.clone());
        Ok(transfer)
    }

    /// Whether decode worker `instance` failed to open recently (its jobs are not claimed).
    fn is_unreachable(&self, instance: u64) -> bool {
        let mut d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        match d.unreachable.get(&instance) {
            Some((since, _)) if since.elapsed() < UNREACHABLE_FOR => true,
            Some(_) => {
                d.unreachable.remove(&instance);
                false
            }
            None => false,
        }
    }

    async fn notify(&self, address: &str, notice: &PrefillNotice) -> Result<NoticeReply, String> {
        let ask = runtime::request_plane::query(self.plane.as_ref(), address, notice);
        tokio::time::timeout(NOTICE_TIMEOUT, ask)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {NOTICE_TIMEOUT:?}")))
    }
}
