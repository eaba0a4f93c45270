//! The composition root: one function per component, each taking the graph's [`Planes`].
//! `baton serve` builds in-process planes and starts every component on them; `baton run X`
//! connects to NATS and etcd and starts component X alone. A new component or event is wired
//! here once, for both.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use decode_worker::{
    worker_endpoint, DecodeWorker, DisaggState, Disaggregation, EngineHost, HostDisagg,
};
use engine::{loader, Engine, EngineOptions, ModelCard, SharedModel};
use frontend::{AdminSettings, AppState, FrontendConfig};
use kv_transfer::KvSink;
use prefill_worker::{PrefillHost, PrefillOptions, PrefillWorker};
use router::{policy_from_name, Router};
use runtime::kv_event::KvEvent;
use runtime::Planes;

use crate::serve::{self, Resolved, ServeArgs};

/// The OpenAI frontend with its processor and router, serving until Ctrl-C / SIGTERM drains.
pub async fn frontend(
    planes: &Planes,
    args: &ServeArgs,
    settings: &Resolved,
    card: &ModelCard,
) -> Result<()> {
    let frontend_config = FrontendConfig {
        addr: SocketAddr::new(args.host, settings.port),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_body_bytes: args.max_body_bytes,
        max_inflight: args.max_inflight,
        max_queued: args.max_queued,
        queue_timeout: args.queue_timeout,
        request_timeout: args.request_timeout,
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    if frontend_config.max_inflight == 0 {
        bail!("`--max-inflight` must be at least 1");
    }
    let router = Router::new(
        planes,
        worker_endpoint(&settings.namespace),
        policy_from_name(&settings.policy, settings.kv_cost)?,
        settings.router.clone(),
    )
    .await?;
    let model = Arc::new(serve::served_model(card, &settings.served_model_name)?);
    let state = Arc::new(
        AppState::new(model, Arc::new(router), frontend_config).with_admin(AdminSettings {
            discovery: planes.discovery.clone(),
            namespace: settings.namespace.clone(),
        }),
    );
    let listener = frontend::bind(&state).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        model = %settings.model,
        served_model_name = %settings.served_model_name,
        router = %settings.policy,
        "ready"
    );
    // Scripts and tests wait for this line.
    println!("baton: listening on http://{addr}");
    let _ = std::io::stdout().flush();
    frontend::serve(state, listener, serve::shutdown_signal()).await?;
    Ok(())
}

/// A decode worker over `model`'s shared weights with its own KV cache, registered and
/// publishing its load and KV events on `planes`.
pub async fn decode_worker(
    planes: &Planes,
    settings: &Resolved,
    model: &SharedModel,
    index: usize,
) -> Result<DecodeWorker> {
    let (kv_tx, kv_rx) = std::sync::mpsc::channel();
    let opts = EngineOptions {
        kv_events: Some(kv_tx),
        ..settings.engine.clone()
    };
    let name = format!("engine-{index}");
    let worker = if settings.disagg.remote_prefill {
        // The KV cache lives in the sink's memory, where prefill workers write.
        let layout = model.kv_layout(&opts)?;
        let sink = KvSink::with_tls(
            layout,
            &settings.sink_backends(),
            settings.kv_host,
            settings.kv_tls_server.clone(),
        )
        .await
        .context("opening the KV cache for prefill workers")?;
        let (engine, _card) = model.engine_in(&opts, Some(sink.memory()))?;
        let endpoints: Vec<String> = sink
            .descriptor()
            .endpoints
            .iter()
            .map(|e| format!("{}={}", e.backend, e.address))
            .collect();
        let worker = start_decode(planes, settings, engine, kv_rx, &name, Some(sink)).await?;
        tracing::info!(kv = ?endpoints, "decode worker takes remote prefills");
        worker
    } else {
        let (engine, _card) = model.engine(&opts)?;
        start_decode(planes, settings, engine, kv_rx, &name, None).await?
    };
    tracing::info!(
        instance = worker.instance_id(),
        index,
        "decode worker ready"
    );
    Ok(worker)
}

/// A decode worker over the mock executor (`--executor mock`): `card`'s vocabulary and limits,
/// the roofline's step times on a real clock divided by `--mock-speedup`. With remote prefill,
/// its cache is a simulated sink: prefill workers' writes take the link's time and move no bytes.
pub async fn mock_decode_worker(
    planes: &Planes,
    settings: &Resolved,
    card: &ModelCard,
    index: usize,
) -> Result<DecodeWorker> {
    let mock = settings.mock.clone().context("not a mock graph")?;
    let (kv_tx, kv_rx) = std::sync::mpsc::channel();
    let opts = EngineOptions {
        kv_events: Some(kv_tx),
        ..settings.engine.clone()
    };
    let roofline = mock.roofline.clone();
    tracing::info!(
        gpu = roofline.gpu.name,
        model = %roofline.model.name,
        tensor_parallel = roofline.tensor_parallel,
        speedup = mock.speedup,
        "simulated decode worker"
    );
    let model = roofline.model.clone();
    let clock = Arc::new(engine::mock::RealClock::new(mock.speedup));
    let engine = engine::mock_engine(card, &opts, roofline, clock)?;
    let name = format!("mock-{index}");
    let worker = if settings.disagg.remote_prefill {
        let layout =
            engine::mock::kv_layout(&model, engine.block_size(), engine.stats().kv_blocks_total);
        let sink = KvSink::simulated(layout, mock.kv_link_bytes_per_s)
            .context("opening the simulated KV link")?;
        let worker = start_decode(planes, settings, engine, kv_rx, &name, Some(sink)).await?;
        tracing::info!(
            link_bytes_per_s = mock.kv_link_bytes_per_s,
            "simulated decode worker takes remote prefills"
        );
        worker
    } else {
        start_decode(planes, settings, engine, kv_rx, &name, None).await?
    };
    tracing::info!(
        instance = worker.instance_id(),
        index,
        "decode worker ready"
    );
    Ok(worker)
}

/// Starts `engine` as a registered decode worker; with `sink`, it takes remote prefills by the
/// graph's disaggregation rule and prefill workers write into the sink.
async fn start_decode(
    planes: &Planes,
    settings: &Resolved,
    engine: Engine,
    kv_events: std::sync::mpsc::Receiver<KvEvent>,
    name: &str,
    sink: Option<KvSink>,
) -> Result<DecodeWorker> {
    let state = sink
        .as_ref()
        .map(|_| DisaggState::new(settings.disagg.clone()));
    let host_disagg = state
        .clone()
        .zip(sink.as_ref())
        .map(|(rule, sink)| HostDisagg {
            rule,
            fences: sink.fences(),
        });
    let host = EngineHost::start_with(engine, Some(kv_events), name, host_disagg)?;
    let disagg = state
        .zip(sink)
        .map(|(state, sink)| Disaggregation { state, sink });
    Ok(DecodeWorker::start_with(host, planes, &settings.served_model_name, disagg).await?)
}

/// A prefill worker over the mock executor, on `PrefillWorker.tensor-parallel-size` simulated
/// GPUs, writing to decode workers through their simulated links.
pub async fn mock_prefill_worker(
    planes: &Planes,
    settings: &Resolved,
    card: &ModelCard,
    index: usize,
) -> Result<PrefillWorker> {
    let mock = settings.mock.clone().context("not a mock graph")?;
    let roofline = mock.prefill_roofline();
    let model = roofline.model.clone();
    let clock = Arc::new(engine::mock::RealClock::new(mock.speedup));
    let engine = engine::mock_engine(card, &settings.prefill_engine, roofline, clock)?;
    let layout =
        engine::mock::kv_layout(&model, engine.block_size(), engine.stats().kv_blocks_total);
    let host = PrefillHost::start(engine, layout, &format!("mock-prefill-{index}"))?;
    // The decode workers offer only their simulated link.
    let options = PrefillOptions {
        backend: kv_transfer::BackendChoice::Auto,
        tls: None,
    };
    let worker = PrefillWorker::start(host, planes, options).await?;
    tracing::info!(
        index,
        tensor_parallel = mock.prefill_tensor_parallel,
        "simulated prefill worker ready"
    );
    Ok(worker)
}

/// A prefill worker over `model`'s shared weights with its own engine, consuming the
/// graph's prefill queue.
pub async fn prefill_worker(
    planes: &Planes,
    settings: &Resolved,
    model: &SharedModel,
    index: usize,
) -> Result<PrefillWorker> {
    let opts = &settings.prefill_engine;
    let layout = model.kv_layout(opts)?;
    let (engine, _card) = model.engine(opts)?;
    let host = PrefillHost::start(engine, layout, &format!("prefill-{index}"))?;
    let options = PrefillOptions {
        backend: settings.kv_transfer,
        tls: settings.kv_tls_client.clone(),
    };
    let worker = PrefillWorker::start(host, planes, options).await?;
    tracing::info!(index, "prefill worker ready");
    Ok(worker)
}

/// Loads and places the weights once, for every worker of this process.
pub async fn load_model(settings: &Resolved) -> Result<SharedModel> {
    // A bad engine option fails before the weights are read, not after.
    settings.engine.check()?;
    let model = settings.model.clone();
    let (kind, device) = (settings.engine.kind, settings.engine.device);
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {model}"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = loader::load(&model).with_context(|| format!("loading `{model}`"))?;
        SharedModel::new(loaded, kind, device).with_context(|| format!("loading `{model}`"))
    })
    .await
    .context("the model loading task failed")?;
    spinner.finish_and_clear();
    // Loading dequantizes to f32 before the cast to the compute dtype; hand those freed pages
    // back to the OS instead of keeping them in the heap for the life of the process.
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    loaded
}

/// The model's card alone (tokenizer, template, limits), for a frontend that holds no weights.
pub async fn load_card(settings: &Resolved) -> Result<ModelCard> {
    let model = settings.model.clone();
    let max_model_len = settings.engine.max_model_len;
    tokio::task::spawn_blocking(move || {
        loader::load_card(&model)
            .map(|card| card.with_max_model_len(max_model_len))
            .with_context(|| format!("reading `{model}`"))
    })
    .await
    .context("the model loading task failed")?
}
