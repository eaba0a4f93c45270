//! Messages from the planes that do not parse are logged and dropped, never trusted and never a
//! panic. [`decode`] parses one and says which field is at fault (serde alone names the type
//! it wanted, not where); [`DropWarnings`] logs the drops of one kind at warn level, at most one
//! line per [`WARN_INTERVAL`] with a count of those it held back, so a peer publishing garbage
//! in a loop cannot flood the log, and cuts each reason short, so a 1 MB string in a bad field
//! does not land in it either.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

/// The most often one kind of drop is logged.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Characters of a reason kept in the log line.
const REASON_CHARS: usize = 240;

/// Parses `bytes` as the JSON object `T` (every message on the planes is one); the error names
/// the field at fault (`data.Stored.blocks[2]`). A top-level array is refused although serde
/// would read it as the struct's fields in order: `[1, 2]` is no message anyone sends.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => return Err("not a JSON object".to_string()),
        None => return Err("empty message".to_string()),
    }
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => e.into_inner().to_string(),
            _ => format!("`{path}`: {}", e.into_inner()),
        }
    })?;
    json.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// The drops of one kind of message (`"a malformed load report"`), rate-limited.
pub struct DropWarnings {
    what: &'static str,
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    held_back: u64,
}

impl DropWarnings {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::new(State {
                last: None,
                held_back: 0,
            }),
        }
    }

    /// Records one drop and why; logs it unless one of this kind was logged within
    /// [`WARN_INTERVAL`]. Returns whether it logged.
    pub fn warn(&self, reason: impl Display) -> bool {
        let held_back = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if state
                .last
                .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
            {
                state.held_back += 1;
                return false;
            }
            state.last = Some(now);
            std::mem::take(&mut state.held_back)
        };
        let reason = shorten(&reason.to_string());
        let what = self.what;
        if held_back == 0 {
            tracing::warn!("dropping {what}: {reason}");
        } else {
            tracing::warn!(
                "dropping {what}: {reason} ({held_back} more dropped since the last warning)"
            );
        }
        true
    }
}

fn shorten(reason: &str) -> String {
    match reason.char_indices().nth(REASON_CHARS) {
        None => reason.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &reason[..cut], reason.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        id: u64,
        inner: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        size: usize,
    }

    #[test]
    fn decode_names_the_field_at_fault() {
        let err =
            decode::<Outer>(br#"{"id": 1, "inner": [{"size": 2}, {"size": "big"}]}"#).unwrap_err();
        assert!(err.starts_with("`inner[1].size`: invalid type"), "{err}");
        let err = decode::<Outer>(br#"{"id": -1, "inner": []}"#).unwrap_err();
        assert!(err.starts_with("`id`:"), "{err}");
        let err = decode::<Outer>(b"\xff\xfe garbage").unwrap_err();
        assert_eq!(err, "not a JSON object");
        let err = decode::<Outer>(b"{\"id\": 1, \xff").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        // serde alone would take this as `Outer { id: 1, inner: [] }`.
        assert_eq!(
            decode::<Outer>(b" [1, []]").unwrap_err(),
            "not a JSON object"
        );
        assert_eq!(decode::<Outer>(b"  ").unwrap_err(), "empty message");
        let err = decode::<Outer>(br#"{"id": 1, "inner": []} trailing"#).unwrap_err();
        assert!(err.contains("trailing"), "{err}");
        assert_eq!(decode::<Outer>(br#"{"id": 7, "inner": []}"#).unwrap().id, 7);
    }

    #[test]
    fn one_warning_per_interval_then_the_count_of_those_held_back() {
        let drops = DropWarnings::new("a test message");
        assert!(drops.warn("first"));
        for _ in 0..1000 {
            assert!(!drops.warn("again"));
        }
        let state = drops.state.lock().unwrap();
        assert_eq!(state.held_back, 1000);
    }

    #[test]
    fn long_reasons_are_cut() {
        let long = "x".repeat(1 << 20);
        let short = shorten(&long);
        assert!(short.len() < 300, "{}", short.len());
        assert!(short.ends_with("(1048576 bytes)"), "{short}");
        assert_eq!(shorten("short"), "short");
    }
}
