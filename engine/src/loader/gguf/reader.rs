//! The GGUF container: header, metadata and tensor directory, read from a memory map with every
//! offset bounds-checked (layout as in ggml's `docs/gguf.md`, versions 2 and 3).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::metadata::{Metadata, MetadataValue};
use crate::error::{EngineError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's `ggml_type` enum in order; ids 4 and 5 were removed types.
const GGML_TYPE_NAMES: &str = "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K \
    Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 \
    IQ1_M BF16 Q4_0_4_4 Q4_0_4_8 Q4_0_8_8 TQ1_0 TQ2_0 IQ4_NL_4_4 IQ4_NL_4_8 IQ4_NL_8_8 MXFP4";

/// A ggml tensor type id; only some have a known block size (and fewer are dequantized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const BF16: Self = Self(30);

    /// The name ggml gives the type (`Q6_K`), as users see it in model file names.
    pub fn name(self) -> String {
        match GGML_TYPE_NAMES.split_whitespace().nth(self.0 as usize) {
            Some(name) => name.to_string(),
            None => format!("ggml type {}", self.0),
        }
    }

    /// Whether ggml has (or had) a type with this id. An id past the end of its enum is not a
    /// type this reader is too old for but a corrupt directory entry: its size is unknown, so
    /// its data range could not be checked either.
    pub fn is_known(self) -> bool {
        (self.0 as usize) < GGML_TYPE_NAMES.split_whitespace().count()
    }

    /// (elements per block, bytes per block), for the types whose size we can check.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 => (1, 4),
            1 | 30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 | 28 => (1, 8),
            _ => return None,
        })
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Element count (saturating; the parser rejects shapes that overflow).
    pub fn num_elements(&self) -> u64 {
        checked_elements(&self.dims).unwrap_or(u64::MAX)
    }

    /// The torch shape: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// An opened GGUF file: parsed header and directory, tensor data still in the map.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap-based loader we accept that another process
        // truncating the file while we read it would fault, which no check here could prevent.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let invalid = |reason| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason,
        };
        let (version, values, tensors) = parse(&map).map_err(invalid)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata: Metadata::new(path.to_path_buf(), values),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of `info`, or an error when its type has no known size.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let Some(len) = byte_len(info) else {
            return Err(EngineError::UnsupportedTensorType {
                kind: info.ggml_type.name(),
                tensor: info.name.clone(),
            });
        };
        let range = usize::try_from(info.offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        range
            .and_then(|r| self.map.get(r))
            .ok_or_else(|| EngineError::InvalidGguf {
                path: self.path.clone(),
                reason: format!(
                    "data of tensor `{}` lies past the end of the file",
                    info.name
                ),
            })
    }
}

/// Bytes of tensor data, when the type's block size is known and the element count fits it.
fn byte_len(info: &TensorInfo) -> Option<u64> {
    let (block, bytes) = info.ggml_type.block_layout()?;
    let n = checked_elements(&info.dims)?;
    (n % block == 0).then(|| (n / block).checked_mul(bytes))?
}

fn checked_elements(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

type Parsed = (u32, BTreeMap<String, MetadataValue>, Vec<TensorInfo>);

fn parse(buf: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Cursor { buf, pos: 0 };
    let magic = r.take(4, "the magic number")?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:02x?}, expected \"GGUF\""));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Checked before any loop runs: a forged count fails here rather than after reading (and
    // holding) everything the file does contain.
    r.fits(kv_count, MIN_KV_BYTES, "metadata entries")?;
    r.fits(
        tensor_count,
        MIN_TENSOR_INFO_BYTES,
        "tensor directory entries",
    )?;

    let mut values = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&format!("the type of metadata `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        values.insert(key, value);
    }

    let alignment = match values.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("`general.alignment` {v:?} is not a power of two")),
        },
    };

    let mut tensors = Vec::with_capacity(capacity(
        tensor_count,
        r.remaining() / MIN_TENSOR_INFO_BYTES as usize,
    ));
    for i in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&format!("the rank of tensor `{name}`"))?;
        if n_dims > 8 {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&format!("the dimensions of tensor `{name}`")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ggml_type = GgmlType(r.u32(&format!("the type of tensor `{name}`"))?);
        if !ggml_type.is_known() {
            return Err(format!(
                "tensor `{name}` has unknown ggml type {} (at byte {})",
                ggml_type.0,
                r.pos - 4
            ));
        }
        let offset = r.u64(&format!("the offset of tensor `{name}`"))?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &mut tensors {
        let relative = t.offset;
        let too_far = |len: Option<u64>| {
            let size = len.map_or_else(String::new, |n| format!(", {n} bytes"));
            format!(
                "data of tensor `{}` (offset {relative} from the data section at byte \
                 {data_start}{size}) lies past the end of the file ({file_len} bytes)",
                t.name
            )
        };
        t.offset = data_start
            .checked_add(relative)
            .ok_or_else(|| too_far(None))?;
        let fits_i64 = |n: u64| i64::try_from(n).is_ok();
        if !checked_elements(&t.dims).is_some_and(fits_i64) {
            return Err(format!(
                "tensor `{}` has an overflowing shape {:?}",
                t.name, t.dims
            ));
        }
        match byte_len(t) {
            Some(len) if t.offset.checked_add(len).is_none_or(|end| end > file_len) => {
                return Err(too_far(Some(len)));
            }
            None if t.ggml_type.block_layout().is_some() => {
                return Err(format!(
                    "tensor `{}` of type {} has a shape {:?} that is not a whole number of blocks",
                    t.name,
                    t.ggml_type.name(),
                    t.dims
                ));
            }
            _ => {}
        }
    }
    Ok((version, values, tensors))
}

/// The smallest metadata entry: an empty key (8-byte length), its type (4) and a one-byte value.
const MIN_KV_BYTES: u64 = 13;
/// The smallest directory entry: an empty name (8), rank 0 (4), the type (4) and the offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 24;

fn capacity(count: u64, limit: usize) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX).min(limit)
}

/// The fewest bytes a metadata value of type `ty` takes (an unknown type is refused when read).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string's length, an array's element type and count.
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails when `count` items of at least `min_bytes` each cannot fit in what is left.
    fn fits(&self, count: u64, min_bytes: u64, what: &str) -> std::result::Result<(), String> {
        let remaining = self.remaining() as u64;
        if count.checked_mul(min_bytes).is_none_or(|n| n > remaining) {
            return Err(format!(
                "file is truncated or corrupt: it claims {count} {what} at byte {}, but only \
                 {remaining} bytes remain",
                self.pos
            ));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(format!(
                "file is truncated: it ends at byte {} while reading {what}",
                self.buf.len()
            ));
        };
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        self.fits(len, 1, &format!("bytes for {what}"))?;
        let at = self.pos;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("{what} (at byte {at}) is not valid UTF-8"))
    }

    fn value(
        &mut self,
        ty: u32,
        key: &str,
        depth: u32,
    ) -> std::result::Result<MetadataValue, String> {
        let what = format!("the value of metadata `{key}`");
        Ok(match ty {
            0 => MetadataValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetadataValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetadataValue::Bool(false),
                1 => MetadataValue::Bool(true),
                b => return Err(format!("metadata `{key}` has boolean byte {b}")),
            },
            8 => MetadataValue::String(self.string(&what)?),
            9 => {
                // Nested arrays are legal but never deeper than a couple of levels in practice.
                if depth >= 4 {
                    return Err(format!("metadata `{key}` nests arrays too deeply"));
                }
                let elem = self.u32(&what)?;
                let count = self.u64(&what)?;
                self.fits(count, min_value_bytes(elem), &format!("elements in {what}"))?;
                // Grown as elements arrive, so a forged count cannot reserve gigabytes up front.
                let mut items = Vec::with_capacity(capacity(count, self.remaining().min(1 << 16)));
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            10 => MetadataValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(format!("metadata `{key}` has unknown value type {other}")),
        })
    }
}
