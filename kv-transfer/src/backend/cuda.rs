//! CUDA backend: the decode worker's cache is device memory from `cuMemAlloc`, published as a
//! CUDA IPC handle; a prefill worker on the same node opens the handle and copies host blocks
//! into it (`cuMemcpyHtoD`). The driver is loaded at run time (cudarc), so a build with the
//! `cuda` feature runs — and reports a clear error — on machines without one.

pub(crate) use imp::*;

#[cfg(not(feature = "cuda"))]
mod imp {
    use crate::error::TransferError;
    use crate::memory::KvMemory;
    use crate::transfer::KvTransfer;

    fn unsupported() -> TransferError {
        TransferError::Cuda("built without the `cuda` feature".into())
    }

    /// Never returned; keeps the sink's code the same with and without the feature.
    pub(crate) enum CudaMemory {}

    impl KvMemory for CudaMemory {
        fn as_mut_ptr(&self) -> *mut u8 {
            match *self {}
        }
        fn len(&self) -> usize {
            match *self {}
        }
        fn location(&self) -> crate::memory::MemoryLocation {
            match *self {}
        }
    }

    pub(crate) fn allocate(
        _len: usize,
        _ordinal: usize,
    ) -> Result<(CudaMemory, String), TransferError> {
        Err(unsupported())
    }

    pub(crate) fn open(
        _desc: &crate::descriptor::KvDescriptor,
        _address: &str,
    ) -> Result<Box<dyn KvTransfer>, TransferError> {
        Err(unsupported())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::ffi::CStr;
    use std::sync::{Arc, OnceLock};

    use async_trait::async_trait;
    use cudarc::driver::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUresult};

    use crate::descriptor::{KvDescriptor, TransferBackend};
    use crate::error::TransferError;
    use crate::fence::{Generation, KvFences};
    use crate::layout::KvLayout;
    use crate::memory::{KvMemory, MemoryLocation};
    use crate::registry;
    use crate::transfer::{attach_fences, KvTransfer};

    fn cuda_err(what: &str, result: CUresult) -> TransferError {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: only reached after `driver()` succeeded; the out-pointer is a local.
        let described = unsafe { sys::cuGetErrorString(result, &mut name) };
        let text = if described == CUresult::CUDA_SUCCESS && !name.is_null() {
            // SAFETY: the driver returns a static NUL-terminated string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        } else {
            format!("{result:?}")
        };
        TransferError::Cuda(format!("{what}: {text}"))
    }

    fn check(what: &str, result: CUresult) -> Result<(), TransferError> {
        match result {
            CUresult::CUDA_SUCCESS => Ok(()),
            other => Err(cuda_err(what, other)),
        }
    }

    /// Loads and initialises the driver once. Every path into CUDA calls this first: cudarc
    /// panics on a missing library, and a machine without a GPU must get an error instead.
    fn driver() -> Result<(), TransferError> {
        static INIT: OnceLock<Result<(), String>> = OnceLock::new();
        INIT.get_or_init(|| {
            // SAFETY: probing for the library has no preconditions.
            if !unsafe { sys::is_culib_present() } {
                return Err(
                    "the CUDA driver library (libcuda) is not present on this machine".into(),
                );
            }
            // SAFETY: the library is present; cuInit may be called any number of times.
            check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(TransferError::Cuda)
    }

    /// The device's primary context (the one tch/PyTorch use too), retained for our lifetime.
    struct Context {
        device: CUdevice,
        ctx: CUcontext,
    }

    // SAFETY: a CUDA context handle may be made current on any thread.
    unsafe impl Send for Context {}
    // SAFETY: as above; the handle is only passed to the driver, which synchronises.
    unsafe impl Sync for Context {}

    impl Context {
        fn primary(ordinal: usize) -> Result<Context, TransferError> {
            driver()?;
            let mut device: CUdevice = 0;
            let index = i32::try_from(ordinal).map_err(|_| {
                TransferError::Cuda(format!("device ordinal {ordinal} is out of range"))
            })?;
            // SAFETY: driver initialised; out-pointers are locals.
            check("cuDeviceGet", unsafe {
                sys::cuDeviceGet(&mut device, index)
            })?;
            let mut ctx: CUcontext = std::ptr::null_mut();
            // SAFETY: as above.
            check("cuDevicePrimaryCtxRetain", unsafe {
                sys::cuDevicePrimaryCtxRetain(&mut ctx, device)
            })?;
            Ok(Context { device, ctx })
        }

        /// Driver calls act on the calling thread's context, and tokio moves tasks between
        /// threads: set it before every batch of calls.
        fn make_current(&self) -> Result<(), TransferError> {
            // SAFETY: `ctx` is retained until drop.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
        }
    }

    impl Drop for Context {
        fn drop(&mut self) {
            // SAFETY: balances the retain in `primary`.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
        }
    }

    /// A cache in device memory; freed when the last `Arc` (sink, engine tensors) goes.
    pub(crate) struct CudaMemory {
        ptr: CUdeviceptr,
        len: usize,
        ordinal: usize,
        ctx: Context,
    }

    impl KvMemory for CudaMemory {
        fn as_mut_ptr(&self) -> *mut u8 {
            self.ptr as *mut u8
        }
        fn len(&self) -> usize {
            self.len
        }
        fn location(&self) -> MemoryLocation {
            MemoryLocation::Cuda {
                ordinal: self.ordinal,
            }
        }
    }

    impl Drop for CudaMemory {
        fn drop(&mut self) {
            if self.ctx.make_current().is_ok() {
                // SAFETY: `ptr` came from cuMemAlloc in this context and nothing uses it once
                // the last Arc is gone.
                unsafe { sys::cuMemFree_v2(self.ptr) };
            }
        }
    }

    /// Zeroed device memory and its IPC handle in hex.
    pub(crate) fn allocate(
        len: usize,
        ordinal: usize,
    ) -> Result<(CudaMemory, String), TransferError> {
        let ctx = Context::primary(ordinal)?;
        ctx.make_current()?;
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: context current; out-pointer is a local.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len) })?;
        // From here on the memory is freed on any error by dropping it.
        let memory = CudaMemory {
            ptr,
            len,
            ordinal,
            ctx,
        };
        // SAFETY: `ptr..ptr+len` is the allocation just made.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, len) })?;
        // SAFETY: context current.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
        // SAFETY: `ptr` is a cuMemAlloc base pointer, the handle a local.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), ptr)
        })?;
        // SAFETY: zero-initialised plain bytes, now filled by the driver.
        let handle = unsafe { handle.assume_init() };
        let hex = handle
            .reserved
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect();
        Ok((memory, hex))
    }

    fn parse_handle(hex: &str) -> Result<sys::CUipcMemHandle, TransferError> {
        let bad =
            || TransferError::Cuda(format!("`{hex}` is not a CUDA IPC handle (128 hex digits)"));
        // SAFETY: the handle is 64 plain bytes.
        let mut handle: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        if !hex.is_ascii() || hex.len() != 2 * handle.reserved.len() {
            return Err(bad());
        }
        for (byte, pair) in handle
            .reserved
            .iter_mut()
            .zip(hex.as_bytes().chunks_exact(2))
        {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())? as std::ffi::c_char;
        }
        Ok(handle)
    }

    /// Writes host blocks into a (possibly other process's) device cache.
    struct CudaWriter {
        base: CUdeviceptr,
        layout: KvLayout,
        /// Set when the pointer came from cuIpcOpenMemHandle and must be closed.
        ipc_opened: bool,
        /// The sink's fence table (its shm segment, or the registry's in-process handle).
        fences: KvFences,
        /// Keeps an in-process cache alive (the same-process path skips IPC, which the
        /// driver refuses within the allocating process).
        _local: Option<Arc<dyn KvMemory>>,
        ctx: Context,
    }

    pub(crate) fn open(
        desc: &KvDescriptor,
        address: &str,
    ) -> Result<Box<dyn KvTransfer>, TransferError> {
        let layout = desc.layout.clone();
        let len = layout.checked_total_bytes()?;
        let ctx = Context::primary(0)?;
        ctx.make_current()?;
        if desc.is_same_process() {
            if let Some(local) = registry::lookup(address) {
                if let MemoryLocation::Cuda { .. } = local.memory.location() {
                    crate::memory::checked_len(&local.layout, &*local.memory)?;
                    return Ok(Box::new(CudaWriter {
                        base: local.memory.as_mut_ptr() as CUdeviceptr,
                        layout: local.layout,
                        ipc_opened: false,
                        fences: local.fences,
                        _local: Some(local.memory),
                        ctx,
                    }));
                }
            }
        }
        let fences = attach_fences(desc)?;
        let handle = parse_handle(address)?;
        let mut base: CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: context current; the handle is plain bytes the driver validates.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags)
        })?;
        let writer = CudaWriter {
            base,
            layout,
            ipc_opened: true,
            fences,
            _local: None,
            ctx,
        };
        let mut size = 0usize;
        // SAFETY: `base` is a mapped device pointer; out-pointer a local.
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(std::ptr::null_mut(), &mut size, base)
        })?;
        if size < len {
            return Err(TransferError::MemoryTooSmall {
                needed: len,
                len: size,
            });
        }
        Ok(Box::new(writer))
    }

    impl Drop for CudaWriter {
        fn drop(&mut self) {
            if self.ipc_opened && self.ctx.make_current().is_ok() {
                // SAFETY: opened by cuIpcOpenMemHandle in this context, closed once.
                unsafe { sys::cuIpcCloseMemHandle(self.base) };
            }
        }
    }

    #[async_trait]
    impl KvTransfer for CudaWriter {
        fn backend(&self) -> TransferBackend {
            TransferBackend::Cuda
        }

        async fn write_blocks(
            &self,
            generation: Generation,
            dst_blocks: &[u32],
            blocks: &[Vec<u8>],
        ) -> Result<u64, TransferError> {
            self.layout.check_write(dst_blocks, blocks)?;
            self.ctx.make_current()?;
            let chunk = self.layout.layer_block_bytes();
            for (&dst, data) in dst_blocks.iter().zip(blocks) {
                let _hold = self.fences.acquire(dst, generation)?;
                for (layer, src) in data.chunks_exact(chunk).enumerate() {
                    let offset = self.layout.offset(layer, dst as usize) as CUdeviceptr;
                    // SAFETY: in bounds (check_write, and the size checked at open); the hold
                    // keeps the destination block granted to this write (memory.rs invariant).
                    check("cuMemcpyHtoD", unsafe {
                        sys::cuMemcpyHtoD_v2(self.base + offset, src.as_ptr().cast(), chunk)
                    })?;
                }
                // A copy from pageable memory may return before its DMA lands: the block is
                // let go only once its bytes are in, and Ok means every byte is there.
                // SAFETY: context current.
                check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })?;
            }
            Ok((blocks.len() * self.layout.block_bytes()) as u64)
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use crate::{KvLayout, KvSink, TransferBackend, TransferError};

    #[tokio::test]
    async fn a_machine_without_libcuda_gets_an_error_not_a_panic() {
        // SAFETY: probing for the library has no preconditions.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a GPU machine: the sink may well succeed
        }
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
            dtype: "f32".into(),
            elem_bytes: 4,
            num_blocks: 2,
        };
        let sink = KvSink::new(
            layout,
            &[TransferBackend::Cuda],
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .await;
        let err = sink.err().expect("no libcuda, yet a CUDA sink");
        assert!(
            matches!(&err, TransferError::Cuda(m) if m.contains("not present")),
            "{err}"
        );
    }
}
