//! One module per transfer backend: how its sink side is opened and how a writer reaches it.

pub(crate) mod cuda;
pub(crate) mod memory;
pub(crate) mod shm;
pub(crate) mod simulated;
pub(crate) mod tcp;
