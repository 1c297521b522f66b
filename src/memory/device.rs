//! Memory of the device a computation runs on, for benchmarks: the counted heap on CPU; on
//! CUDA the stream-ordered memory pool every candle tensor is allocated from, whose used-memory
//! high-water mark is kept by the driver itself (so the peak is exact, not sampled).

use anyhow::Result;
use candle_core::Device;

/// Bytes in use on `device` now (after the work queued on it has finished).
pub fn live_bytes(device: &Device) -> Result<usize> {
    device.synchronize()?;
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => pool::used(d, pool::Mark::Current),
        _ => Ok(super::live_bytes()),
    }
}

/// Bytes free for new allocations on `device`: the kernel's `MemAvailable` on the CPU (Linux),
/// the driver's free memory on CUDA; None where it cannot be known.
pub fn available_bytes(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            d.cuda_stream().context().bind_to_thread()?;
            let (free, _total) = candle_core::cuda::cudarc::driver::result::mem_get_info()?;
            Ok(Some(free as u64))
        }
        _ => Ok(std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .map(|kb| kb * 1024)
            })),
    }
}

/// Restarts peak tracking on `device` from what is in use now.
pub fn reset_peak(device: &Device) -> Result<()> {
    device.synchronize()?;
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => pool::reset_high(d),
        _ => {
            super::reset_peak();
            Ok(())
        }
    }
}

/// Highest use of `device` since the last [`reset_peak`].
pub fn peak_bytes(device: &Device) -> Result<usize> {
    device.synchronize()?;
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => pool::used(d, pool::Mark::High),
        _ => Ok(super::peak_bytes()),
    }
}

#[cfg(feature = "cuda")]
mod pool {
    use anyhow::Result;
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::CudaDevice;
    use std::ffi::c_void;

    pub enum Mark {
        Current,
        High,
    }

    fn default_pool(device: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let stream = device.cuda_stream();
        let context = stream.context();
        context.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: the context is current on this thread and `pool` is a valid out-pointer.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) }.result()?;
        Ok(pool)
    }

    pub fn used(device: &CudaDevice, mark: Mark) -> Result<usize> {
        let attribute = match mark {
            Mark::Current => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            Mark::High => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let mut value: u64 = 0;
        // SAFETY: these attributes are 64-bit unsigned integers, written to `value`.
        unsafe {
            sys::cuMemPoolGetAttribute(
                default_pool(device)?,
                attribute,
                &mut value as *mut u64 as *mut c_void,
            )
        }
        .result()?;
        Ok(value as usize)
    }

    pub fn reset_high(device: &CudaDevice) -> Result<()> {
        // The driver accepts only zero here, meaning "restart from the current use".
        let mut zero: u64 = 0;
        // SAFETY: as in `used`; the attribute is settable and 64 bits wide.
        unsafe {
            sys::cuMemPoolSetAttribute(
                default_pool(device)?,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut c_void,
            )
        }
        .result()?;
        Ok(())
    }
}
