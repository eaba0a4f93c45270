//! Where packed weights live: zeroed memory starting on a cache line. glibc's large
//! allocations start 16 bytes past a page, so every 64-byte row of a strip straddled two lines;
//! AMX tile loads ran at a quarter of their speed then (a 32-row × 576 × 32 strip product: 214
//! cycles per K block against 62 aligned), and every AVX-512 load of a strip was split.
//!
//! Tried and left out: 2 MiB alignment with `MADV_HUGEPAGE` (THP is `madvise`-only here). 86 MiB
//! of the weights got huge pages and decode steps were no faster (engine-bench, batch 1/8/32:
//! 11.0 / 16.6 / 36.8 ms against 10.8 / 15.1 / 34.3 without), so the TLB is not what bounds
//! them on this machine.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Element types for which all-zero bytes are a valid value.
pub trait Plain: Copy {}
impl Plain for u16 {}
impl Plain for f32 {}

const LINE: usize = 64;

pub struct WeightBuffer<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
    layout: Layout,
    _owns: PhantomData<T>,
}

// SAFETY: owns its allocation like a Vec<T>.
unsafe impl<T: Plain + Send> Send for WeightBuffer<T> {}
unsafe impl<T: Plain + Sync> Sync for WeightBuffer<T> {}

impl<T: Plain> WeightBuffer<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * std::mem::size_of::<T>()).max(LINE);
        let layout = Layout::from_size_align(bytes, LINE).expect("weight buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `bytes` bytes at `raw` are ours; zero is a valid `T`.
        unsafe { std::ptr::write_bytes(raw, 0, bytes) };
        WeightBuffer {
            ptr: ptr.cast(),
            len,
            layout,
            _owns: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialized values at `ptr`, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Drop for WeightBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_start_on_a_line() {
        for len in [0usize, 1, 31, 1000, (4 << 20) / 2 + 7] {
            let mut b = WeightBuffer::<u16>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&v| v == 0));
            let at = b.as_slice().as_ptr() as usize;
            assert_eq!(at % LINE, 0, "{len} elements at {at:#x}");
            if let Some(last) = b.as_mut_slice().last_mut() {
                *last = 7;
            }
        }
    }
}
