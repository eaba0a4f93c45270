//! Why the `safetensors` crate refused a file, in words that name the part at fault: the
//! crate's own errors say "invalid header length" or "invalid shape, data type, or offset for
//! tensor" without the sizes or the tensor. Only run after the crate failed, so it re-reads the
//! header with the same layout rules (8-byte little-endian length, a JSON object of
//! `{dtype, shape, data_offsets}` entries plus `__metadata__`, data offsets relative to the end
//! of the header, tensors back to back up to the end of the file).

use safetensors::tensor::TensorInfo;
use safetensors::SafeTensorError;
use serde_json::Value;

/// Bytes of the header length that opens every safetensors file.
const LENGTH_BYTES: usize = 8;

/// A reason naming what in `file` is wrong, or the crate's own message when nothing more
/// specific is found.
pub fn explain(file: &[u8], error: &SafeTensorError) -> String {
    match find_fault(file) {
        Some(reason) => reason,
        None => error.to_string(),
    }
}

fn find_fault(file: &[u8]) -> Option<String> {
    let file_len = file.len();
    let Some(length) = file.get(..LENGTH_BYTES) else {
        return Some(format!(
            "the file has {file_len} bytes, fewer than the {LENGTH_BYTES}-byte header length"
        ));
    };
    let mut raw = [0u8; LENGTH_BYTES];
    raw.copy_from_slice(length);
    let header_len = u64::from_le_bytes(raw);
    let after = (file_len - LENGTH_BYTES) as u64;
    if header_len > after {
        return Some(format!(
            "the header length {header_len} is larger than the {after} bytes that follow it \
             (the file is truncated, or the length is corrupt)"
        ));
    }
    let data_start = LENGTH_BYTES + header_len as usize;
    let header = &file[LENGTH_BYTES..data_start];
    let text = match std::str::from_utf8(header) {
        Ok(text) => text,
        Err(e) => {
            return Some(format!(
                "the header (bytes {LENGTH_BYTES}..{data_start}) is not UTF-8: {e}"
            ))
        }
    };
    let entries = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(entries)) => entries,
        Ok(other) => {
            return Some(format!(
                "the header is {}, not a JSON object of tensors",
                json_kind(&other)
            ))
        }
        Err(e) => {
            return Some(format!(
                "the header (bytes {LENGTH_BYTES}..{data_start}) is not valid JSON: {e}"
            ))
        }
    };
    let data_len = file_len - data_start;
    let mut tensors = Vec::new();
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        match serde_json::from_value::<TensorInfo>(entry.clone()) {
            Ok(info) => tensors.push((name.as_str(), info)),
            Err(e) => return Some(format!("header entry of tensor `{name}`: {e}")),
        }
    }
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mut expected_start = 0;
    for (name, info) in &tensors {
        let (start, end) = info.data_offsets;
        let bytes = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        let Some(bytes) = bytes else {
            return Some(format!(
                "tensor `{name}` has shape {:?}, whose size overflows",
                info.shape
            ));
        };
        if end < start || end - start != bytes {
            return Some(format!(
                "tensor `{name}`: {} of shape {:?} takes {bytes} bytes, but its data_offsets \
                 [{start}, {end}] span {}",
                info.dtype,
                info.shape,
                end.saturating_sub(start)
            ));
        }
        if start != expected_start {
            return Some(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] do not start where the previous \
                 tensor's data ends ({expected_start})"
            ));
        }
        if end > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] run past the end of the file, \
                 whose data section has {data_len} bytes (the file is truncated)"
            ));
        }
        expected_start = end;
    }
    if expected_start != data_len {
        return Some(format!(
            "the file has {} bytes after the last tensor's data (at {expected_start} of the data \
             section)",
            data_len - expected_start
        ));
    }
    None
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
