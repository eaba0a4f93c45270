//! Shared-memory backend: the decode worker's cache *is* a `/dev/shm` file, mapped
//! `MAP_SHARED` by the sink (and so by the engine's tensors) and by each same-host prefill
//! worker, so a write is a plain copy into the writer's own mapping of the same pages.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::error::TransferError;
use crate::memory::HostMemory;

const SHM_DIR: &str = "/dev/shm";
const PREFIX: &str = "baton-kv-";

fn shm_err(path: &Path, reason: impl ToString) -> TransferError {
    TransferError::Shm {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The sink's file; unlinked when the sink drops. Mappings made before (the engine's, writers')
/// stay valid: the pages go away with the last of them.
pub(crate) struct ShmFile {
    path: PathBuf,
}

impl ShmFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not unlink the KV shm file");
        }
    }
}

/// The creator's pid of a segment's file name (`baton-kv-{pid}-{hex}`).
fn creator_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes segments whose creator is gone: a decode worker killed with SIGKILL cannot unlink
/// its file, and tmpfs would hold those pages until reboot. A segment a live process still maps
/// keeps its pages anyway; only the name goes.
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir(SHM_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(creator_pid) else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed the KV segment of a dead process");
        }
    }
}

/// Creates a fresh zero-filled file of `len` bytes and maps it.
pub(crate) fn create(len: usize) -> Result<(HostMemory, ShmFile), TransferError> {
    remove_orphans();
    let name = format!(
        "{PREFIX}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let path = Path::new(SHM_DIR).join(name);
    // create_new: a name clash must never make two sinks share a cache.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| shm_err(&path, format!("create: {e}")))?;
    // From here on the guard unlinks the file if anything below fails.
    let guard = ShmFile { path };
    // A tmpfs file grows sparse and reads as zeros: the cache starts zeroed without a pass.
    file.set_len(len as u64)
        .map_err(|e| shm_err(&guard.path, format!("set length {len}: {e}")))?;
    // SAFETY: the file is ours alone (fresh unique name, mode 0600) and keeps its length for
    // the sink's lifetime, so the mapping cannot be truncated under the engine (no SIGBUS).
    let map = unsafe { MmapMut::map_mut(&file) }
        .map_err(|e| shm_err(&guard.path, format!("mmap {len} bytes: {e}")))?;
    Ok((HostMemory::from_mapping(map), guard))
}

/// A writer's mapping of a sink's file (the cache, or its fence table), after checking it is
/// one (name) of the `expected` size.
pub(crate) fn open(path: &str, expected: usize) -> Result<HostMemory, TransferError> {
    let path = Path::new(path);
    // The path comes from discovery: map nothing but a Baton KV file, never e.g. /etc/...
    let is_ours = path.parent() == Some(Path::new(SHM_DIR))
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PREFIX));
    if !is_ours {
        return Err(shm_err(
            path,
            format!("not a Baton KV segment (`{SHM_DIR}/{PREFIX}*`)"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| shm_err(path, format!("open: {e}")))?;
    let actual = file
        .metadata()
        .map_err(|e| shm_err(path, format!("stat: {e}")))?
        .len();
    if actual != expected as u64 {
        return Err(shm_err(
            path,
            format!("the file holds {actual} bytes but the descriptor's layout needs {expected}"),
        ));
    }
    // SAFETY: the sink owning the file keeps its length fixed; should it exit, the file is
    // unlinked but the pages stay until this mapping goes too. Only a foreign process
    // truncating the 0600 file could fault us, which this crate never does.
    let map =
        unsafe { MmapMut::map_mut(&file) }.map_err(|e| shm_err(path, format!("mmap: {e}")))?;
    Ok(HostMemory::from_mapping(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_of_a_dead_process_is_removed_when_a_sink_is_created() {
        // Pid 2^22 + 1 is above Linux's pid_max limit: no process has it.
        let orphan = Path::new(SHM_DIR).join(format!("{PREFIX}4194305-00000000deadbeef"));
        std::fs::write(&orphan, b"stale").unwrap();
        let (_memory, mine) = create(4096).unwrap();
        assert!(!orphan.exists(), "the orphan is gone");
        assert!(mine.path().exists(), "the live one stays");
        assert_eq!(creator_pid("baton-kv-123-abc"), Some(123));
        assert_eq!(creator_pid("other"), None);
    }
}
