//! The thread that owns a prefill worker's engine. Jobs run one at a time: the prompt is
//! prefilled as a prefill-only request, its blocks are read out while the engine holds them,
//! then released (their full blocks stay in this worker's prefix cache).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use engine::{Engine, Request, RequestOutput, SampledToken};
use tokio::sync::oneshot;

use crate::PrefillError;

/// A computed prompt: its first token and its KV blocks from `from_block` on.
#[derive(Debug)]
pub struct Prefilled {
    pub first: SampledToken,
    pub blocks: Vec<Vec<u8>>,
}

struct Job {
    request: Request,
    from_block: usize,
    reply: oneshot::Sender<Result<Prefilled, PrefillError>>,
}

pub struct PrefillHost {
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    layout: kv_transfer::KvLayout,
    /// KV blocks held by requests after the last job (0 unless one leaked).
    used: Arc<AtomicUsize>,
}

impl PrefillHost {
    /// Moves `engine` (whose KV cache has `layout`) onto a thread named `name`.
    pub fn start(
        engine: Engine,
        layout: kv_transfer::KvLayout,
        name: &str,
    ) -> Result<Self, PrefillError> {
        let (tx, rx) = std_mpsc::channel();
        let used = Arc::new(AtomicUsize::new(0));
        let thread_used = used.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(engine, rx, thread_used))
            .map_err(PrefillError::Spawn)?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            layout,
            used,
        })
    }

    pub fn layout(&self) -> &kv_transfer::KvLayout {
        &self.layout
    }

    /// KV blocks in use in this worker's engine after its last job (its prefix cache aside).
    pub fn kv_blocks_used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Prefills `request` and returns its blocks from `from_block` on.
    pub async fn prefill(
        &self,
        request: Request,
        from_block: usize,
    ) -> Result<Prefilled, PrefillError> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            // The job in a send error is of no use once the engine thread is gone.
            .map(|tx| {
                tx.send(Job {
                    request,
                    from_block,
                    reply,
                })
                .is_ok()
            });
        match sent {
            Some(true) => rx.await.map_err(|_| PrefillError::EngineStopped)?,
            _ => Err(PrefillError::EngineStopped),
        }
    }

    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for PrefillHost {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(mut engine: Engine, jobs: std_mpsc::Receiver<Job>, used: Arc<AtomicUsize>) {
    while let Ok(job) = jobs.recv() {
        let result = prefill(&mut engine, job.request, job.from_block);
        used.store(engine.stats().kv_blocks_used, Ordering::Relaxed);
        let _ = job.reply.send(result);
    }
}

fn prefill(
    engine: &mut Engine,
    request: Request,
    from_block: usize,
) -> Result<Prefilled, PrefillError> {
    let id = request.request_id.clone();
    engine
        .add_prefill_request(request)
        .map_err(|e| PrefillError::Refused(e.to_string()))?;
    let result = loop {
        let outputs = match engine.step() {
            Ok(o) => o,
            Err(e) => break Err(PrefillError::Failed(e.to_string())),
        };
        let mine = outputs.into_iter().find(|o| o.request_id() == id);
        match mine {
            Some(RequestOutput::Prefilled {
                token, block_ids, ..
            }) => {
                let from = from_block.min(block_ids.len());
                break engine
                    .read_kv_blocks(&block_ids[from..])
                    .map(|blocks| Prefilled {
                        first: token,
                        blocks,
                    })
                    .map_err(|e| PrefillError::Failed(e.to_string()));
            }
            Some(RequestOutput::Failed { error, .. }) => {
                break Err(PrefillError::Failed(error.to_string()))
            }
            Some(_) => break Err(PrefillError::Failed("unexpected engine output".into())),
            // A chunk of a long prompt: more steps to go.
            None if engine.has_work() => continue,
            None => break Err(PrefillError::Failed("the engine stopped stepping".into())),
        }
    };
    engine.abort(&id);
    result
}
