//! The process-global table of in-process KV caches: how a prefill engine in `baton serve`
//! finds the decode engine's cache by the name its descriptor carries, with no socket or file
//! in between.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::fence::KvFences;
use crate::layout::KvLayout;
use crate::memory::KvMemory;

struct Registered {
    memory: Arc<dyn KvMemory>,
    layout: KvLayout,
    fences: KvFences,
}

/// What an in-process writer finds under a registered name.
pub(crate) struct Local {
    pub(crate) memory: Arc<dyn KvMemory>,
    pub(crate) layout: KvLayout,
    pub(crate) fences: KvFences,
}

fn table() -> MutexGuard<'static, HashMap<String, Registered>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Registered>>> = OnceLock::new();
    // A panic while holding the lock cannot leave the map half-updated (single insert/remove),
    // so a poisoned lock is still usable.
    TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh name no other sink of this process (or, through the pid, of another) uses.
pub(crate) fn unique_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "baton-kv-{}-{seq}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Removes its entry when dropped (with the sink that owns it).
pub(crate) struct Registration {
    name: String,
}

impl Registration {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        table().remove(&self.name);
    }
}

pub(crate) fn register(
    name: String,
    memory: Arc<dyn KvMemory>,
    layout: KvLayout,
    fences: KvFences,
) -> Registration {
    table().insert(
        name.clone(),
        Registered {
            memory,
            layout,
            fences,
        },
    );
    Registration { name }
}

/// The memory, layout and fences registered as `name`, if a live sink of this process holds
/// it.
pub(crate) fn lookup(name: &str) -> Option<Local> {
    table().get(name).map(|r| Local {
        memory: r.memory.clone(),
        layout: r.layout.clone(),
        fences: r.fences.clone(),
    })
}
