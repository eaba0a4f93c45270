//! The composition root: one function per component, each taking the graph's [`Planes`].
//! `baton serve` builds in-process planes and starts every component on them; `baton run X`
//! connects to NATS and etcd and starts component X alone. A new component or event is wired
//! here once, for both.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use decode_worker::{worker_endpoint, DecodeWorker, EngineHost};
use engine::{loader, EngineOptions, ModelCard, SharedModel};
use frontend::{AppState, FrontendConfig};
use router::{policy_from_name, Router};
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
    let state = Arc::new(AppState::new(model, Arc::new(router), frontend_config));
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
    let (engine, _card) = model.engine(&opts)?;
    let host = EngineHost::start(engine, Some(kv_rx), &format!("engine-{index}"))?;
    let worker = DecodeWorker::start(host, planes, &settings.served_model_name).await?;
    tracing::info!(
        instance = worker.instance_id(),
        index,
        "decode worker ready"
    );
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
        SharedModel::new(loaded, kind, device).map_err(anyhow::Error::from)
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
