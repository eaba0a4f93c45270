//! Work queue for remote prefills (DESIGN.md §2).
