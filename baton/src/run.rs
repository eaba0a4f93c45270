//! `baton run <component>`: one component as its own process, joined to the others through
//! etcd (discovery, leases) and NATS (request and event planes, the JetStream prefill queue),
//! as the seed runs Dynamo. The component itself is started by the same function `baton
//! serve` uses (`components`), over network planes instead of in-process ones.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use runtime::Planes;

use crate::components;
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

pub fn run(args: RunArgs) -> Result<()> {
    let settings = serve::settings(&args.serve)?;
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    tokio_rt.block_on(async move {
        let planes = connect(&settings).await?;
        match args.component {
            Component::Frontend => {
                // The frontend needs the tokenizer and template, never the weights.
                let card = components::load_card(&settings).await?;
                components::frontend(&planes, &args.serve, &settings, &card).await?;
                eprintln!("baton: frontend stopped");
            }
            Component::DecodeWorker => {
                let worker = if settings.mock.is_some() {
                    let card = components::load_card(&settings).await?;
                    components::mock_decode_worker(&planes, &settings, &card, 0).await?
                } else {
                    let model = components::load_model(&settings).await?;
                    components::decode_worker(&planes, &settings, &model, 0).await?
                };
                tokio::select! {
                    _ = serve::shutdown_signal() => {}
                    reason = worker.failed() => {
                        // Its lease is being revoked; once etcd no longer lists it, a non-zero
                        // exit lets a supervisor (`baton serve`, systemd, Kubernetes) start a
                        // healthy worker.
                        wait_withdrawn(&planes, &settings, worker.instance_id()).await;
                        bail!("the decode worker's engine died: {reason}");
                    }
                }
                // Drain: no new requests, those in flight finish (or migrate at the deadline).
                // Operators (and the soak test) read leaks from the line below: a drained
                // worker holds no block for a request.
                let in_use = worker
                    .drain(std::time::Duration::from_secs(args.serve.drain_timeout))
                    .await;
                eprintln!("baton: decode worker stopped with {in_use} KV blocks in use");
            }
            Component::PrefillWorker => {
                let worker = if settings.mock.is_some() {
                    let card = components::load_card(&settings).await?;
                    components::mock_prefill_worker(&planes, &settings, &card, 0).await?
                } else {
                    let model = components::load_model(&settings).await?;
                    components::prefill_worker(&planes, &settings, &model, 0).await?
                };
                serve::shutdown_signal().await;
                let in_use = worker.kv_blocks_used();
                worker.stop();
                eprintln!("baton: prefill worker stopped with {in_use} KV blocks in use");
            }
        }
        Ok(())
    })
}

/// Waits (up to 2 s) until discovery no longer lists decode worker `id`: the revoke is the
/// keep-alive task's round trip to etcd, which exiting at once could cut short.
async fn wait_withdrawn(planes: &Planes, settings: &Resolved, id: u64) {
    let endpoint = decode_worker::worker_endpoint(&settings.namespace);
    for _ in 0..20 {
        match planes.discovery.watch(&endpoint).await {
            Ok((now, _)) if !now.iter().any(|i| i.instance_id == id) => return,
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read discovery: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tracing::warn!("still listed in discovery after 2 s; its lease ends with its TTL");
}

async fn connect(settings: &Resolved) -> Result<Planes> {
    let (Some(nats), Some(etcd)) = (&settings.nats, &settings.etcd) else {
        bail!(
            "`baton run` needs NATS and etcd: set NATS_SERVER and ETCD_ENDPOINTS (or \
             --nats-server / --etcd-endpoints, or `Baton.nats-server` / \
             `Baton.etcd-endpoints` in the config)"
        );
    };
    Ok(Planes::connect(settings.plane_settings(), nats, etcd).await?)
}
