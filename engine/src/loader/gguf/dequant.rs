//! Dequantization of ggml tensor data to f32, block layouts as in ggml's `ggml-quants.c`.
//!
//! Everything runs over plain byte slices into one `Vec<f32>`: a per-element tch call would make
//! the 135M-parameter SmolLM2 take seconds instead of a fraction of one.

use half::{bf16, f16};

use super::reader::GgmlType;

/// Elements per quantization block for every block type handled here.
const QK: usize = 32;

/// Decodes `data` (exactly the tensor's bytes) of type `ty`; `None` when the type is not handled.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => data.chunks_exact(2).map(|b| half_at(b, 0)).collect(),
        GgmlType::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        GgmlType::Q8_0 => blocks(data, 34, |block, out| {
            let d = half_at(block, 0);
            for (o, &q) in out.iter_mut().zip(&block[2..]) {
                *o = f32::from(q as i8) * d;
            }
        }),
        GgmlType::Q4_0 => blocks(data, 18, |block, out| {
            let d = half_at(block, 0);
            nibbles(&block[2..], out, |q| (q as f32 - 8.0) * d);
        }),
        GgmlType::Q4_1 => blocks(data, 20, |block, out| {
            let (d, m) = (half_at(block, 0), half_at(block, 2));
            nibbles(&block[4..], out, |q| q as f32 * d + m);
        }),
        _ => return None,
    })
}

/// The f16 at `at`; callers index within fixed-size blocks, so the bytes are always there.
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Runs `decode` over each `block_bytes` block, each producing `QK` outputs.
fn blocks(data: &[u8], block_bytes: usize, decode: impl Fn(&[u8], &mut [f32])) -> Vec<f32> {
    let mut out = vec![0f32; data.len() / block_bytes * QK];
    for (block, dst) in data.chunks_exact(block_bytes).zip(out.chunks_exact_mut(QK)) {
        decode(block, dst);
    }
    out
}

/// 4-bit quants: byte `j` holds element `j` in its low nibble and element `j + 16` in its high one.
fn nibbles(qs: &[u8], out: &mut [f32], value: impl Fn(u8) -> f32) {
    let (low, high) = out.split_at_mut(QK / 2);
    for ((&q, lo), hi) in qs.iter().zip(low).zip(high) {
        *lo = value(q & 0x0f);
        *hi = value(q >> 4);
    }
}
