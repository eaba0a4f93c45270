//! Event plane: pub/sub for KV events and load (DESIGN.md §2).
