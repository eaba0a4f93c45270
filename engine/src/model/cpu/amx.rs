//! `y (+)= x · W` on AMX tiles, for bf16 weights on CPUs with `amx_bf16` (Sapphire Rapids and
//! later Xeons). One `tdpbf16ps` multiplies a 16 × 32 block of x by a 32 × 16 block of W into
//! 16 × 16 f32 sums — 8 192 multiply-adds, where `vdpbf16ps` does 32 — so a step of several
//! rows (batched decode, short prompt chunks) stops being bound by arithmetic and streams the
//! weights at memory speed. Longer prompt chunks stay on libtorch, whose oneDNN GEMMs on tiles
//! are faster from about 64 rows on (benches/README.md, "AMX tiles").
//!
//! The packed strips of [`super::matmul`] are already AMX's B layout: a strip's pair-row `p`
//! holds its 32 columns × 2 inputs, so the 16 pair-rows of one K block, read 128 bytes apart,
//! are the B tile of columns 0–15, and the same 64 bytes further on the B tile of 16–31. The
//! strips are padded to whole K blocks (16 pairs) with zeros, and x to whole tiles of rows, so
//! every tile is full and one tile configuration serves every shape.
//!
//! Tiles: 0–3 accumulate a 32-row × 32-column block (rows 0–15 in 0 and 1, rows 16–31 in 2 and
//! 3), 4–5 hold x's two row tiles, 6–7 the strip's two column tiles. The tile registers are the
//! thread's, and the same threads run libtorch's oneDNN kernels, which configure tiles of their
//! own: each call configures them on entry and releases them on the way out.
//!
//! Rust's AMX intrinsics are not stable, so the instructions are inline assembly.

use std::arch::asm;
use std::sync::OnceLock;

use super::matmul::{K_BLOCK_PAIRS, STRIP};

/// Rows of x in one tile.
pub const TILE_ROWS: usize = 16;

/// Whether this CPU and kernel run AMX bf16 tiles for this process. Linux hands out the tile
/// state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per
/// process); without it the first tile instruction is SIGILL.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        // CPUID.(EAX=7, ECX=0):EDX bit 22 amx_bf16, bit 24 amx_tile; std's detection of them
        // is not stable.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let cpu = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
        if !cpu || !std::is_x86_feature_detected!("avx512f") {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    })
}

/// The 64-byte `ldtilecfg` operand: palette 1, eight tiles of 16 rows × 64 bytes — the one
/// shape every tile kernel here uses.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Configures this thread's tiles ([`CONFIG`]), zeroing them.
///
/// # Safety
/// [`available`] returned true.
#[inline]
pub unsafe fn configure() {
    // SAFETY: AMX was granted to the process (the caller's promise); CONFIG is a valid palette.
    unsafe { asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
}

/// Gives this thread's tile state back: the same threads run libtorch's oneDNN kernels, which
/// configure tiles of their own, and an idle tile state keeps the thread's XSAVE area small.
///
/// # Safety
/// [`available`] returned true.
#[inline]
pub unsafe fn release() {
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        // colsb (u16, little-endian) of tile t at 16 + 2t; rows of tile t at 48 + t.
        c[16 + 2 * t] = 64;
        c[48 + t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

/// Strips `s0..s1` of `y (+)= x · W`. `x` is `[m rounded up to 16][kpp]` bf16 pairs (the rows
/// past `m` and the pairs past the weight's K are zeros), 64-byte aligned; `w` the packed
/// strips, `kpp` pairs each (a multiple of [`K_BLOCK_PAIRS`]), 64-byte aligned.
///
/// # Safety
/// [`available`] returned true; the pointers cover the shapes given; each caller of one
/// matmul writes its own strips of `y`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn strips(
    x: *const u32,
    m: usize,
    kpp: usize,
    w: *const u16,
    s0: usize,
    s1: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    debug_assert!(kpp.is_multiple_of(K_BLOCK_PAIRS));
    let mut c = Sums([0f32; 4 * TILE_ROWS * 16]);
    let x_stride = kpp * 4;
    let w_stride = STRIP * 2 * 2;
    // SAFETY: AMX was granted to the process (the caller's promise).
    unsafe { configure() };
    // Row blocks outside, strips inside: for a step of many rows a block's rows of x stay near
    // while the strips stream by (at most 1.1× faster than the other order at 512 rows, where
    // libtorch's GEMMs take over anyway; the same for a decode step's one block).
    let mut r0 = 0;
    while r0 < m {
        let rows = (2 * TILE_ROWS).min(m - r0);
        let xr = unsafe { x.add(r0 * kpp) };
        for s in s0..s1 {
            let ws = unsafe { w.add(s * kpp * STRIP * 2) };
            let cols = STRIP.min(n - s * STRIP);
            // SAFETY: every tile read lies inside `x` (rows padded to 16) and the strip.
            unsafe {
                if rows > TILE_ROWS {
                    block2(xr, x_stride, ws, w_stride, kpp, &mut c);
                } else {
                    block1(xr, x_stride, ws, w_stride, kpp, &mut c);
                }
            }
            for r in 0..rows {
                let yr = unsafe {
                    std::slice::from_raw_parts_mut(y.add((r0 + r) * ldy + s * STRIP), cols)
                };
                for (h, out) in yr.chunks_mut(16).enumerate() {
                    let tile = (r / TILE_ROWS) * 2 + h;
                    let at = tile * TILE_ROWS * 16 + (r % TILE_ROWS) * 16;
                    let sums = &c.0[at..at + out.len()];
                    if accumulate {
                        out.iter_mut().zip(sums).for_each(|(o, v)| *o += v);
                    } else {
                        out.copy_from_slice(sums);
                    }
                }
            }
        }
        r0 += rows;
    }
    // SAFETY: as above.
    unsafe { release() };
}

/// The four accumulator tiles as stored, 16 × 16 f32 each.
#[repr(C, align(64))]
struct Sums([f32; 4 * TILE_ROWS * 16]);

/// 32 rows of x against one strip: tiles 0–3.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block2(x: *const u32, xs: usize, w: *const u16, ws: usize, kpp: usize, c: &mut Sums) {
    let x1 = unsafe { x.add(TILE_ROWS * kpp) };
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    let kbs = kpp / K_BLOCK_PAIRS;
    for kb in 0..kbs {
        let (a0, a1) = unsafe { (x.add(kb * K_BLOCK_PAIRS), x1.add(kb * K_BLOCK_PAIRS)) };
        let b0 = unsafe { w.add(kb * K_BLOCK_PAIRS * STRIP * 2) };
        let b1 = unsafe { b0.add(16 * 2) };
        unsafe {
            asm!(
                "tileloadd tmm6, [{b0} + {ws}*1]",
                "tileloadd tmm7, [{b1} + {ws}*1]",
                "tileloadd tmm4, [{a0} + {xs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {xs}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                ws = in(reg) ws,
                xs = in(reg) xs,
                options(nostack, readonly)
            );
        }
    }
    let t = TILE_ROWS * 16;
    let p = c.0.as_mut_ptr();
    unsafe {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) p,
            c1 = in(reg) p.add(t),
            c2 = in(reg) p.add(2 * t),
            c3 = in(reg) p.add(3 * t),
            s = in(reg) 64usize,
            options(nostack)
        );
    }
}

/// Up to 16 rows of x against one strip: tiles 0 and 1.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block1(x: *const u32, xs: usize, w: *const u16, ws: usize, kpp: usize, c: &mut Sums) {
    unsafe { asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem)) };
    let kbs = kpp / K_BLOCK_PAIRS;
    for kb in 0..kbs {
        let a0 = unsafe { x.add(kb * K_BLOCK_PAIRS) };
        let b0 = unsafe { w.add(kb * K_BLOCK_PAIRS * STRIP * 2) };
        let b1 = unsafe { b0.add(16 * 2) };
        unsafe {
            asm!(
                "tileloadd tmm6, [{b0} + {ws}*1]",
                "tileloadd tmm7, [{b1} + {ws}*1]",
                "tileloadd tmm4, [{a0} + {xs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                a0 = in(reg) a0,
                ws = in(reg) ws,
                xs = in(reg) xs,
                options(nostack, readonly)
            );
        }
    }
    let p = c.0.as_mut_ptr();
    unsafe {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            c0 = in(reg) p,
            c1 = in(reg) p.add(TILE_ROWS * 16),
            s = in(reg) 64usize,
            options(nostack)
        );
    }
}
