//! Mooncake request traces (`../shared/traces/`, FAST'25): one JSON object per line with the
//! arrival `timestamp` in ms, `input_length`, `output_length` and the `hash_ids` of the prompt's
//! 512-token blocks. A trace carries no text, so prompts are synthesised block by block: every
//! hash id stands for the same tokens wherever it appears, which gives requests whose id lists
//! start alike the shared prefixes (and KV-cache hits) of the original workload.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

/// Tokens per hash id in Mooncake's traces.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct TraceRequest {
    /// Arrival, ms after the trace's start.
    #[serde(rename = "timestamp")]
    pub timestamp_ms: u64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read the trace {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a Mooncake trace record: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "{path}:{line}: input_length {input_length} does not fit {blocks} hash ids of \
         {block_tokens} tokens"
    )]
    Lengths {
        path: PathBuf,
        line: usize,
        input_length: usize,
        blocks: usize,
        block_tokens: usize,
    },
    #[error("{path}:{line}: timestamp {timestamp_ms} ms comes before the previous line's")]
    Order {
        path: PathBuf,
        line: usize,
        timestamp_ms: u64,
    },
    #[error("the trace {0} holds no requests")]
    Empty(PathBuf),
}

/// Reads a whole trace, checking that each line's blocks cover its prompt and that arrivals
/// are in order (replay relies on both).
pub fn load(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, MOONCAKE_BLOCK_TOKENS)
}

/// [`load`] of text already read; `path` only names the source in errors.
pub fn parse(
    path: &Path,
    text: &str,
    block_tokens: usize,
) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out: Vec<TraceRequest> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = n + 1;
        let r: TraceRequest = serde_json::from_str(line).map_err(|e| TraceError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            reason: e.to_string(),
        })?;
        let blocks = r.hash_ids.len();
        if r.input_length == 0
            || r.input_length > blocks * block_tokens
            || r.input_length <= blocks.saturating_sub(1) * block_tokens
        {
            return Err(TraceError::Lengths {
                path: path.to_path_buf(),
                line: line_no,
                input_length: r.input_length,
                blocks,
                block_tokens,
            });
        }
        if out.last().is_some_and(|p| p.timestamp_ms > r.timestamp_ms) {
            return Err(TraceError::Order {
                path: path.to_path_buf(),
                line: line_no,
                timestamp_ms: r.timestamp_ms,
            });
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(TraceError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

/// Synthetic tokens for hash ids: block `id` is `block_tokens` tokens drawn from `alphabet` by a
/// generator seeded with (`seed`, `id`), so equal ids are equal tokens and different ids differ.
#[derive(Clone, Debug)]
pub struct BlockTokens {
    alphabet: Vec<u32>,
    block_tokens: usize,
    seed: u64,
}

impl BlockTokens {
    /// `alphabet`: the token ids prompts may use (for text endpoints, ids that survive a
    /// decode/encode round trip one for one). Panics on an empty alphabet: a caller's bug.
    pub fn new(alphabet: Vec<u32>, block_tokens: usize, seed: u64) -> Self {
        assert!(
            !alphabet.is_empty(),
            "a prompt alphabet needs at least one token"
        );
        assert!(block_tokens > 0, "a block holds at least one token");
        BlockTokens {
            alphabet,
            block_tokens,
            seed,
        }
    }

    /// Ids `lo..hi`, for graphs whose tokens are never decoded (the simulation).
    pub fn range(lo: u32, hi: u32, block_tokens: usize, seed: u64) -> Self {
        Self::new((lo..hi).collect(), block_tokens, seed)
    }

    /// The tokens of one block.
    pub fn block(&self, id: u64) -> Vec<u32> {
        // Mixing the id through a different stream than the seed keeps blocks of one seed
        // unrelated to blocks of the next.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(id);
        (0..self.block_tokens)
            .map(|_| self.alphabet[rng.random_range(0..self.alphabet.len())])
            .collect()
    }

    /// A request's prompt: its blocks in order, cut to `input_length`.
    pub fn prompt(&self, r: &TraceRequest) -> Vec<u32> {
        let mut out = Vec::with_capacity(r.hash_ids.len() * self.block_tokens);
        for &id in &r.hash_ids {
            out.extend(self.block(id));
        }
        out.truncate(r.input_length);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<TraceRequest>, TraceError> {
        parse(Path::new("t.jsonl"), text, 4)
    }

    #[test]
    fn equal_hash_ids_give_equal_prefixes_and_lengths_are_exact() {
        let t = parse_str(concat!(
            r#"{"timestamp": 0, "input_length": 7, "output_length": 3, "hash_ids": [0, 1]}"#,
            "\n",
            r#"{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [0, 2, 3]}"#,
        ))
        .unwrap();
        let b = BlockTokens::range(100, 50_000, 4, 9);
        let (p, q) = (b.prompt(&t[0]), b.prompt(&t[1]));
        assert_eq!((p.len(), q.len()), (7, 10));
        assert_eq!(p[..4], q[..4]);
        assert_ne!(p[4..], q[4..7]);
        assert_ne!(b.block(1), BlockTokens::range(100, 50_000, 4, 10).block(1));
    }

    #[test]
    fn bad_lines_are_named() {
        let short =
            r#"{"timestamp": 0, "input_length": 9, "output_length": 3, "hash_ids": [0, 1]}"#;
        let e = parse_str(short).unwrap_err().to_string();
        assert!(
            e.contains("t.jsonl:1") && e.contains("input_length 9"),
            "{e}"
        );
        let late = concat!(
            r#"{"timestamp": 9, "input_length": 2, "output_length": 3, "hash_ids": [0]}"#,
            "\n",
            r#"{"timestamp": 3, "input_length": 2, "output_length": 3, "hash_ids": [0]}"#,
        );
        let e = parse_str(late).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:2") && e.contains("timestamp 3"), "{e}");
        let e = parse_str(r#"{"timestamp": "x"}"#).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1"), "{e}");
        assert!(matches!(parse_str("\n"), Err(TraceError::Empty(_))));
    }

    #[test]
    fn the_shared_mooncake_trace_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/traces/conversation_trace.jsonl");
        let t = load(&path).unwrap();
        assert_eq!(t.len(), 12_031);
        assert_eq!(t.last().unwrap().timestamp_ms, 3_536_999);
    }
}
