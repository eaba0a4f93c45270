//! The thread that owns an [`Engine`]: it applies queued commands (add, abort) between steps,
//! steps while any request is unfinished, and sleeps on its command channel when idle. Each
//! request's events go to its own channel; a closed channel (the caller went away) aborts the
//! request, so no path leaves KV blocks behind.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use engine::{Engine, Request, RequestOutput};
use runtime::kv_event::KvEvent;
use runtime::protocol::{GenerateRequest, TokenDelta, TokenLogprob, WorkerLoad};
use tokio::sync::{mpsc, watch};

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
}

enum Command {
    Add {
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    Abort(String),
    Shutdown,
}

struct Stream {
    events: mpsc::UnboundedSender<EngineEvent>,
    logprobs: bool,
}

pub struct EngineHost {
    commands: std_mpsc::Sender<Command>,
    load: watch::Receiver<WorkerLoad>,
    kv_events: Mutex<Option<mpsc::UnboundedReceiver<KvEvent>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The engine thread's outlets besides each request's own channel.
struct Outlets {
    load: watch::Sender<WorkerLoad>,
    /// The block manager's events (`EngineOptions::kv_events`), and where they go on.
    kv_in: Option<std_mpsc::Receiver<KvEvent>>,
    kv_out: mpsc::UnboundedSender<KvEvent>,
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
        let (commands, rx) = std_mpsc::channel();
        let (load_tx, load) = watch::channel(load_of(&engine));
        let (kv_out, kv_rx) = mpsc::unbounded_channel();
        let outlets = Outlets {
            load: load_tx,
            kv_in: kv_events,
            kv_out,
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(engine, rx, outlets))
            .map_err(WorkerError::Spawn)?;
        Ok(Self {
            commands,
            load,
            kv_events: Mutex::new(Some(kv_rx)),
            thread: Mutex::new(Some(thread)),
        })
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

fn run(mut engine: Engine, rx: std_mpsc::Receiver<Command>, outlets: Outlets) {
    let mut streams: HashMap<String, Stream> = HashMap::new();
    loop {
        // Block only when there is nothing to step.
        let first = if engine.has_unfinished() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(std_mpsc::TryRecvError::Empty) => None,
                Err(std_mpsc::TryRecvError::Disconnected) => break,
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
                Command::Add { request, events } => add(&mut engine, &mut streams, request, events),
                Command::Abort(id) => {
                    engine.abort(&id);
                    streams.remove(&id);
                }
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            break;
        }
        // A caller that went away without an abort (its task was dropped) still frees blocks.
        streams.retain(|id, s| {
            let open = !s.events.is_closed();
            if !open {
                engine.abort(id);
            }
            open
        });
        if engine.has_unfinished() {
            match engine.step() {
                Ok(outputs) => {
                    for out in outputs {
                        dispatch(&mut engine, &mut streams, out);
                    }
                }
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    fail_all(
                        &mut engine,
                        &mut streams,
                        &format!("engine step failed: {e}"),
                    );
                }
            }
        }
        outlets.publish(&engine);
    }
    fail_all(&mut engine, &mut streams, "the worker is shutting down");
    outlets.publish(&engine);
}

fn add(
    engine: &mut Engine,
    streams: &mut HashMap<String, Stream>,
    request: GenerateRequest,
    events: mpsc::UnboundedSender<EngineEvent>,
) {
    let id = request.request_id.clone();
    let logprobs = request.sampling.logprobs.is_some();
    let added = engine.add_request(Request {
        request_id: request.request_id,
        prompt_token_ids: request.token_ids,
        params: request.sampling,
    });
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

fn dispatch(engine: &mut Engine, streams: &mut HashMap<String, Stream>, out: RequestOutput) {
    let Some(stream) = streams.get(out.request_id()) else {
        return;
    };
    let event = match &out {
        RequestOutput::Failed { error, .. } => EngineEvent::Failed(error.to_string()),
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
    let id = out.request_id();
    if stream.events.send(event).is_err() {
        engine.abort(id);
        streams.remove(id);
    } else if out.is_final() {
        streams.remove(id);
    }
}

fn fail_all(engine: &mut Engine, streams: &mut HashMap<String, Stream>, message: &str) {
    for (id, stream) in streams.drain() {
        engine.abort(&id);
        let _ = stream.events.send(EngineEvent::Failed(message.to_string()));
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
    }
}
