//! `baton run <component>`: one component as its own process, joined to the others through
//! etcd (discovery, leases) and NATS (request and event planes), as the seed runs Dynamo.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use decode_worker::{worker_endpoint, DecodeWorker, EngineHost};
use frontend::LoadSource;
use router::{policy_from_name, Router};
use runtime::discovery::{Discovery, EtcdDiscovery};
use runtime::event_plane::{EventPlane, NatsEventPlane};
use runtime::protocol::WorkerLoad;
use runtime::request_plane::{NatsRequestPlane, RequestPlane};

use crate::serve::{self, Resolved, ServeArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Component {
    Frontend,
    DecodeWorker,
    PrefillWorker,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[arg(value_enum)]
    component: Component,
    #[command(flatten)]
    serve: ServeArgs,
}

/// How often a worker publishes its load on `{namespace}.load`.
const LOAD_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(args: RunArgs) -> Result<()> {
    let settings = serve::settings(&args.serve)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let planes = Planes::connect(&settings).await?;
        match args.component {
            Component::Frontend => frontend(&args.serve, &settings, planes).await,
            Component::DecodeWorker => decode_worker(&settings, planes).await,
            Component::PrefillWorker => bail!(
                "the prefill worker comes with disaggregation; run the graph aggregated \
                 (decode workers only) until then"
            ),
        }
    })
}

struct Planes {
    discovery: Arc<dyn Discovery>,
    requests: Arc<dyn RequestPlane>,
    events: Arc<dyn EventPlane>,
}

impl Planes {
    async fn connect(settings: &Resolved) -> Result<Self> {
        let (Some(nats), Some(etcd)) = (&settings.nats, &settings.etcd) else {
            bail!(
                "`baton run` needs NATS and etcd: set NATS_SERVER and ETCD_ENDPOINTS (or \
                 --nats-server / --etcd-endpoints, or `Baton.nats-server` / \
                 `Baton.etcd-endpoints` in the config)"
            );
        };
        let discovery = EtcdDiscovery::connect(etcd, settings.lease_ttl).await?;
        let requests = NatsRequestPlane::connect(nats, settings.stream_timeout).await?;
        let events = NatsEventPlane::connect(nats).await?;
        Ok(Self {
            discovery: Arc::new(discovery),
            requests: Arc::new(requests),
            events: Arc::new(events),
        })
    }
}

async fn frontend(args: &ServeArgs, settings: &Resolved, planes: Planes) -> Result<()> {
    let policy = policy_from_name(&settings.policy)?;
    let endpoint = worker_endpoint(&settings.namespace);
    let router = Arc::new(
        Router::new(
            planes.discovery.as_ref(),
            planes.requests.clone(),
            endpoint,
            policy,
        )
        .await?,
    );
    // The processor needs the model's tokenizer and template; the weights are dropped.
    let model_name = settings.model.clone();
    let card = tokio::task::spawn_blocking(move || {
        engine::loader::load(&model_name)
            .map(|m| m.card)
            .with_context(|| format!("loading `{model_name}`"))
    })
    .await
    .context("the model loading task failed")??;
    let model = Arc::new(serve::served_model(&card, &settings.served_model_name)?);
    let loads = load_table(&planes, &settings.namespace, router.clone()).await?;
    serve::serve_http(args, settings, router, model, loads).await?;
    eprintln!("baton: frontend stopped");
    Ok(())
}

/// The latest load each live worker published.
async fn load_table(planes: &Planes, namespace: &str, router: Arc<Router>) -> Result<LoadSource> {
    let mut updates = planes
        .events
        .subscribe(&format!("{namespace}.load"))
        .await?;
    let table: Arc<Mutex<HashMap<u64, WorkerLoad>>> = Arc::default();
    let writer = table.clone();
    tokio::spawn(async move {
        while let Some(bytes) = updates.recv().await {
            if let Ok(load) = serde_json::from_slice::<WorkerLoad>(&bytes) {
                writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(load.instance_id, load);
            }
        }
    });
    Ok(Arc::new(move || {
        let live: HashSet<u64> = router.instances().iter().map(|i| i.instance_id).collect();
        let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|id, _| live.contains(id));
        table.values().cloned().collect()
    }))
}

async fn decode_worker(settings: &Resolved, planes: Planes) -> Result<()> {
    let (engine, _card) = serve::load_engine(settings, 0).await?;
    let host = EngineHost::start(engine, "engine-0")?;
    let worker = DecodeWorker::start(
        host,
        planes.discovery.as_ref(),
        planes.requests.clone(),
        worker_endpoint(&settings.namespace),
        &settings.served_model_name,
    )
    .await?;
    tracing::info!(instance = worker.instance_id(), "decode worker ready");
    let subject = format!("{}.load", settings.namespace);
    let (host, events, id) = (
        worker.host().clone(),
        planes.events.clone(),
        worker.instance_id(),
    );
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(LOAD_INTERVAL);
        loop {
            tick.tick().await;
            let load = WorkerLoad {
                instance_id: id,
                ..host.load()
            };
            let bytes = serde_json::to_vec(&load).expect("protocol types serialize");
            if let Err(e) = events.publish(&subject, bytes).await {
                tracing::warn!("cannot publish load: {e}");
            }
        }
    });
    serve::shutdown_signal().await;
    publisher.abort();
    // Withdraw from discovery first, so no new request is routed here while the rest fail.
    worker.stop();
    eprintln!("baton: decode worker stopped");
    Ok(())
}
