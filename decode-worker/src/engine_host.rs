//! The thread that owns an [`Engine`]: it applies queued commands (add, abort) between steps,
//! steps while any request is unfinished, and sleeps on its command channel when idle. Each
//! request's events go to its own channel; a closed channel (the caller went away) aborts the
//! request, so no path leaves KV blocks behind.
//!
//! Blocks reserved for a remote prefill may be granted to a prefill worker's writes (the KV
//! sink's fence table, `remote_prefill.rs`). Every path that ends such a reservation — abort,
//! local prefill, completion — closes the grant here first, on the thread that frees the
//! blocks, so no write can land after the engine reuses them. A writer stopped in mid-copy
//! keeps its blocks out of use: the release waits, between steps, until it lets go or dies.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use engine::{AdmissionError, Engine, Request, RequestOutput, SampledToken, SamplingParams};
use kv_transfer::KvFences;
use runtime::kv_event::KvEvent;
use runtime::protocol::{GenerateRequest, PrefillCounters, TokenDelta, TokenLogprob, WorkerLoad};
use tokio::sync::{mpsc, watch};

use crate::disagg::{DisaggState, Placement};
use crate::error::WorkerError;

/// What the engine thread reports about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Tokens(TokenDelta),
    /// Refused before it ran: a user error (`param` names the culprit when known).
    Rejected {
        message: String,
        param: Option<String>,
    },
    /// Failed while running; the engine has freed its blocks.
    Failed(String),
    /// The disaggregation rule sent its prefill to the queue: these blocks (the whole prompt,
    /// the first `cached_blocks` already computed here) await a prefill worker. Tokens follow
    /// once [`EngineHost::complete_remote`] or [`EngineHost::prefill_locally`] is called.
    RemotePrefill {
        block_ids: Vec<u32>,
        cached_blocks: usize,
        /// The prompt and parameters, for the prefill job.
        token_ids: Vec<u32>,
        sampling: SamplingParams,
    },
}

enum Command {
    Add {
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    Abort(String),
    CompleteRemote {
        request_id: String,
        first: SampledToken,
    },
    PrefillLocally(String),
    Shutdown,
}

struct Stream {
    events: mpsc::UnboundedSender<EngineEvent>,
    logprobs: bool,
}

/// A host's disaggregation: the live rule placing prefills, and the fence table of the KV
/// sink its cache lives in.
pub struct HostDisagg {
    pub rule: Arc<DisaggState>,
    pub fences: KvFences,
}

/// How long the engine thread waits, per release, for a writer in mid-copy before it defers
/// the release to a later turn (a copy of a block takes microseconds to milliseconds).
const CLOSE_PATIENCE: Duration = Duration::from_millis(2);
/// How often deferred releases are tried again while nothing else wakes the thread.
const DEFERRED_RETRY: Duration = Duration::from_millis(10);

pub struct EngineHost {
    commands: std_mpsc::Sender<Command>,
    vocab_size: usize,
    counters: Arc<Mutex<PrefillCounters>>,
    load: watch::Receiver<WorkerLoad>,
    kv_events: Mutex<Option<mpsc::UnboundedReceiver<KvEvent>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set (once) when the engine thread died of a panic: the worker must leave discovery and
    /// its process exit, so a supervisor starts a healthy one.
    fault: watch::Receiver<Option<String>>,
}

/// Test-only fault injection: the engine thread panics after this many steps (a stand-in for
/// a bug outside `Engine::step`'s own recovery). Read once per host; unset in production.
const PANIC_AFTER_STEPS_ENV: &str = "BATON_TEST_ENGINE_PANIC_AFTER_STEPS";

/// The engine thread's outlets besides each request's own channel.
struct Outlets {
    load: watch::Sender<WorkerLoad>,
    /// The block manager's events (`EngineOptions::kv_events`), and where they go on.
    kv_in: Option<std_mpsc::Receiver<KvEvent>>,
    kv_out: mpsc::UnboundedSender<KvEvent>,
}

/// How the engine thread places prefills: the live rule (none: always local) and the counts
/// it keeps of where they went.
struct Placer {
    disagg: Option<Arc<DisaggState>>,
    counters: Arc<Mutex<PrefillCounters>>,
}

impl Placer {
    fn count(&self, f: impl FnOnce(&mut PrefillCounters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Outlets {
    /// Passes on what the last step did: its KV events, in order, then the load after it.
    fn publish(&self, engine: &Engine) {
        if let Some(kv_in) = &self.kv_in {
            for event in kv_in.try_iter() {
                let _ = self.kv_out.send(event);
            }
        }
        let now = load_of(engine);
        self.load.send_if_modified(|last| {
            let changed = *last != now;
            *last = now;
            changed
        });
    }
}

impl EngineHost {
    /// Moves `engine` onto a new thread named `name`. `kv_events` is the receiving end of the
    /// sender the engine was built with (`EngineOptions::kv_events`), if any.
    pub fn start(
        engine: Engine,
        kv_events: Option<std_mpsc::Receiver<KvEvent>>,
        name: &str,
    ) -> Result<Self, WorkerError> {
        Self::start_with(engine, kv_events, name, None)
    }

    /// As [`EngineHost::start`], placing each prompt's prefill by `disagg`'s rule: remote ones
    /// reserve their blocks and report [`EngineEvent::RemotePrefill`]; their grants in
    /// `disagg`'s fences are closed before the blocks are freed.
    pub fn start_with(
        engine: Engine,
        kv_events: Option<std_mpsc::Receiver<KvEvent>>,
        name: &str,
        disagg: Option<HostDisagg>,
    ) -> Result<Self, WorkerError> {
        let (commands, rx) = std_mpsc::channel();
        let counters = Arc::new(Mutex::new(PrefillCounters::default()));
        let (rule, fences) = match disagg {
            Some(HostDisagg { rule, fences }) => (Some(rule), Some(fences)),
            None => (None, None),
        };
        let placer = Placer {
            disagg: rule,
            counters: counters.clone(),
        };
        let grants = Grants {
            fences,
            ..Grants::default()
        };
        let vocab_size = engine.vocab_size();
        let (load_tx, load) = watch::channel(load_of(&engine));
        let (kv_out, kv_rx) = mpsc::unbounded_channel();
        let outlets = Outlets {
            load: load_tx,
            kv_in: kv_events,
            kv_out,
        };
        let panic_after = std::env::var(PANIC_AFTER_STEPS_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let (fault_tx, fault) = watch::channel(None);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // A panic here ends the thread: its requests' channels drop with it (their
                // tasks end them with an error or migrate them) and the fault is reported.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(engine, rx, outlets, placer, grants, panic_after)
                }));
                if let Err(panic) = ran {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!("the engine thread died: {what}");
                    let _ = fault_tx.send(Some(what));
                }
            })
            .map_err(WorkerError::Spawn)?;
        Ok(Self {
            commands,
            vocab_size,
            counters,
            load,
            kv_events: Mutex::new(Some(kv_rx)),
            thread: Mutex::new(Some(thread)),
            fault,
        })
    }

    /// Resolves with the reason once the engine thread has died of a panic (never, while it
    /// runs or after a clean shutdown).
    pub async fn failed(&self) -> String {
        let mut fault = self.fault.clone();
        loop {
            if let Some(reason) = fault.borrow_and_update().clone() {
                return reason;
            }
            if fault.changed().await.is_err() {
                // The thread ended without a fault: nothing will ever be reported.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Tokens the engine's model knows (a remote prefill's first token must be one).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The engine's KV events, in order (once: the worker publishes them).
    pub fn take_kv_events(&self) -> Option<mpsc::UnboundedReceiver<KvEvent>> {
        self.kv_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The load after each step, for a publisher that waits for changes.
    pub fn load_watch(&self) -> watch::Receiver<WorkerLoad> {
        self.load.clone()
    }

    /// Queues `request`; its events arrive on `events` until a finish, rejection or failure.
    pub fn add(
        &self,
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> Result<(), WorkerError> {
        self.commands
            .send(Command::Add { request, events })
            .map_err(|_| WorkerError::EngineStopped)
    }

    pub fn abort(&self, request_id: &str) {
        let _ = self.commands.send(Command::Abort(request_id.to_string()));
    }

    /// A prefill worker filled the blocks of `request_id` and sampled `first`: it decodes on.
    /// Ignored when the request no longer waits for it.
    pub fn complete_remote(&self, request_id: &str, first: SampledToken) {
        let _ = self.commands.send(Command::CompleteRemote {
            request_id: request_id.to_string(),
            first,
        });
    }

    /// Gives up on the remote prefill of `request_id`: it prefills in this engine.
    pub fn prefill_locally(&self, request_id: &str) {
        let _ = self
            .commands
            .send(Command::PrefillLocally(request_id.to_string()));
    }

    /// Where prefills went and how KV arrived, since start.
    pub fn prefill_counters(&self) -> Arc<Mutex<PrefillCounters>> {
        self.counters.clone()
    }

    /// The engine's load after its latest step.
    pub fn load(&self) -> WorkerLoad {
        self.load.borrow().clone()
    }

    /// Fails every request still running and joins the thread.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHost {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How a reservation for a remote prefill ends.
enum Release {
    Abort,
    PrefillLocally,
    Complete(SampledToken),
}

/// The blocks of requests waiting for a remote prefill (those a claimant may be granted), and
/// the releases waiting for a writer in mid-copy to let go.
#[derive(Default)]
struct Grants {
    fences: Option<KvFences>,
    blocks: HashMap<String, Vec<u32>>,
    deferred: Vec<(String, Release)>,
}

impl Grants {
    /// Ends `id`'s reservation as `how` says, after closing its grant; deferred while a
    /// writer holds one of its blocks.
    fn release(
        &mut self,
        engine: &mut Engine,
        streams: &mut HashMap<String, Stream>,
        id: &str,
        how: Release,
    ) {
        if let (Some(fences), Some(blocks)) = (&self.fences, self.blocks.get(id)) {
            if let Err(held) = fences.close(blocks, CLOSE_PATIENCE) {
                if !self.deferred.iter().any(|(d, _)| d == id) {
                    tracing::warn!(
                        request = id,
                        block = held.block,
                        writer_pid = held.holder_pid,
                        "a prefill writer is stopped in mid-copy; its blocks stay out of use \
                         until it lets go or exits"
                    );
                }
                self.deferred.retain(|(d, _)| d != id);
                self.deferred.push((id.to_string(), how));
                return;
            }
        }
        self.blocks.remove(id);
        self.deferred.retain(|(d, _)| d != id);
        match how {
            Release::Abort => {
                engine.abort(id);
                streams.remove(id);
            }
            Release::PrefillLocally => {
                engine.prefill_locally(id);
            }
            Release::Complete(first) => match engine.complete_remote_prefill(id, first) {
                Ok(out) => dispatch(engine, streams, self, out),
                Err(e) => tracing::debug!("late remote prefill ignored: {e}"),
            },
        }
    }

    /// Tries the deferred releases again.
    fn retry(&mut self, engine: &mut Engine, streams: &mut HashMap<String, Stream>) {
        for (id, how) in std::mem::take(&mut self.deferred) {
            self.release(engine, streams, &id, how);
        }
    }
}

fn run(
    mut engine: Engine,
    rx: std_mpsc::Receiver<Command>,
    outlets: Outlets,
    placer: Placer,
    mut grants: Grants,
    panic_after: Option<u64>,
) {
    let mut streams: HashMap<String, Stream> = HashMap::new();
    let mut steps = 0u64;
    loop {
        // Block only when there is nothing to step (requests waiting for a remote prefill
        // are woken by a command; deferred releases are retried on a timer).
        let first = if engine.has_work() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(std_mpsc::TryRecvError::Empty) => None,
                Err(std_mpsc::TryRecvError::Disconnected) => break,
            }
        } else if !grants.deferred.is_empty() {
            match rx.recv_timeout(DEFERRED_RETRY) {
                Ok(c) => Some(c),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => break,
            }
        };
        let mut shutdown = false;
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match command {
                Command::Add { request, events } => add(
                    &mut engine,
                    &mut streams,
                    &placer,
                    &mut grants,
                    request,
                    events,
                ),
                Command::Abort(id) => {
                    grants.release(&mut engine, &mut streams, &id, Release::Abort)
                }
                Command::CompleteRemote { request_id, first } => grants.release(
                    &mut engine,
                    &mut streams,
                    &request_id,
                    Release::Complete(first),
                ),
                Command::PrefillLocally(id) => {
                    grants.release(&mut engine, &mut streams, &id, Release::PrefillLocally)
                }
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            break;
        }
        grants.retry(&mut engine, &mut streams);
        // A caller that went away without an abort (its task was dropped) still frees blocks.
        let gone: Vec<String> = streams
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            grants.release(&mut engine, &mut streams, &id, Release::Abort);
        }
        if engine.has_work() {
            steps += 1;
            if panic_after.is_some_and(|n| steps > n) {
                panic!("injected by {PANIC_AFTER_STEPS_ENV} after {steps} steps");
            }
            match engine.step() {
                Ok(outputs) => {
                    for out in outputs {
                        dispatch(&mut engine, &mut streams, &mut grants, out);
                    }
                }
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    fail_all(
                        &mut engine,
                        &mut streams,
                        &mut grants,
                        &format!("engine step failed: {e}"),
                    );
                }
            }
        }
        outlets.publish(&engine);
    }
    fail_all(
        &mut engine,
        &mut streams,
        &mut grants,
        "the worker is shutting down",
    );
    outlets.publish(&engine);
}

fn add(
    engine: &mut Engine,
    streams: &mut HashMap<String, Stream>,
    placer: &Placer,
    grants: &mut Grants,
    request: GenerateRequest,
    events: mpsc::UnboundedSender<EngineEvent>,
) {
    let id = request.request_id.clone();
    let logprobs = request.sampling.logprobs.is_some();
    let request = Request {
        request_id: request.request_id,
        prompt_token_ids: request.token_ids,
        params: request.sampling,
    };
    let placement = match &placer.disagg {
        Some(rule) => {
            let hit = engine.cached_prefix_len(&request.prompt_token_ids);
            rule.place(request.prompt_token_ids.len(), hit)
        }
        None => Placement::Local,
    };
    let added = match placement {
        Placement::Remote => {
            // The job needs the prompt again, and so does the local queue if no blocks are free.
            let (token_ids, sampling) = (request.prompt_token_ids.clone(), request.params.clone());
            match engine.add_remote_prefill_request(request) {
                Ok(slot) => {
                    placer.count(|c| c.remote += 1);
                    let cached_blocks = slot.cached_tokens / engine.block_size();
                    grants.blocks.insert(
                        id.clone(),
                        slot.block_ids
                            .get(cached_blocks..)
                            .unwrap_or_default()
                            .to_vec(),
                    );
                    let _ = events.send(EngineEvent::RemotePrefill {
                        block_ids: slot.block_ids,
                        cached_blocks,
                        token_ids,
                        sampling,
                    });
                    Ok(())
                }
                // No blocks to reserve now: it waits for them in the local queue instead.
                Err(AdmissionError::NoFreeBlocks(request_id)) => {
                    placer.count(|c| c.local += 1);
                    engine.add_request(Request {
                        request_id,
                        prompt_token_ids: token_ids,
                        params: sampling,
                    })
                }
                Err(e) => Err(e),
            }
        }
        Placement::Local | Placement::LocalQueueFull => {
            let added = engine.add_request(request);
            if added.is_ok() {
                placer.count(|c| {
                    c.local += 1;
                    if placement == Placement::LocalQueueFull {
                        c.fallback("queue_full");
                    }
                });
            }
            added
        }
    };
    match added {
        Ok(()) => {
            streams.insert(id, Stream { events, logprobs });
        }
        Err(e) => {
            let _ = events.send(EngineEvent::Rejected {
                param: e.param().map(str::to_string),
                message: e.to_string(),
            });
        }
    }
}

fn dispatch(
    engine: &mut Engine,
    streams: &mut HashMap<String, Stream>,
    grants: &mut Grants,
    out: RequestOutput,
) {
    let Some(stream) = streams.get(out.request_id()) else {
        return;
    };
    let event = match &out {
        RequestOutput::Failed { error, .. } => EngineEvent::Failed(error.to_string()),
        // A decode worker never runs prefill-only requests.
        RequestOutput::Prefilled { .. } => return,
        RequestOutput::Tokens { tokens, .. } if tokens.is_empty() => return,
        RequestOutput::Tokens { tokens, usage, .. }
        | RequestOutput::Finished { tokens, usage, .. } => {
            let logprobs = if stream.logprobs {
                tokens
                    .iter()
                    .map(|t| TokenLogprob {
                        logprob: t.logprob,
                        top: t.top_logprobs.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            EngineEvent::Tokens(TokenDelta {
                token_ids: tokens.iter().map(|t| t.token).collect(),
                logprobs,
                finish_reason: out.finish_reason(),
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: usage.cached_tokens,
            })
        }
    };
    let id = out.request_id().to_string();
    if stream.events.send(event).is_err() {
        grants.release(engine, streams, &id, Release::Abort);
    } else if out.is_final() {
        streams.remove(&id);
    }
}

/// Fails every request, each through the same release as an abort.
fn fail_all(
    engine: &mut Engine,
    streams: &mut HashMap<String, Stream>,
    grants: &mut Grants,
    message: &str,
) {
    let ids: Vec<String> = streams.keys().cloned().collect();
    for id in ids {
        if let Some(stream) = streams.get(&id) {
            let _ = stream.events.send(EngineEvent::Failed(message.to_string()));
        }
        grants.release(engine, streams, &id, Release::Abort);
        streams.remove(&id);
    }
}

fn load_of(engine: &Engine) -> WorkerLoad {
    let s = engine.stats();
    WorkerLoad {
        instance_id: 0,
        kv_blocks_used: s.kv_blocks_used,
        kv_blocks_total: s.kv_blocks_total,
        running: s.running,
        waiting: s.waiting,
        prefix_hit_tokens: s.prefix_hit_tokens,
        prefix_query_tokens: s.prefix_query_tokens,
        // The publisher adds the disaggregation counters, which change off this thread too.
        prefill: PrefillCounters::default(),
    }
}
