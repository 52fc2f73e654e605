//! GPU discovery through the CUDA driver API, loaded at run time (`libcuda.so.1`).
//!
//! No driver, no device, or any driver error means zero GPUs: a CPU-only node is a normal node, never
//! a crash.

use libloading::{Library, Symbol};
use std::ffi::{c_char, c_int};

/// One GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
}

type CuInit = unsafe extern "C" fn(flags: u32) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(count: *mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(device: *mut c_int, ordinal: c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(name: *mut c_char, len: c_int, device: c_int) -> c_int;

/// Lists the GPUs the CUDA driver sees (empty without a driver).
pub fn detect() -> Vec<GpuInfo> {
    detect_with("libcuda.so.1").unwrap_or_default()
}

fn detect_with(library: &str) -> Option<Vec<GpuInfo>> {
    // SAFETY: loading libcuda runs its initialisers, which are designed to be loaded into any process;
    // we only call the documented driver entry points below with the signatures the CUDA driver API
    // declares for them.
    unsafe {
        let lib = Library::new(library).ok()?;
        let init: Symbol<CuInit> = lib.get(b"cuInit\0").ok()?;
        let count_fn: Symbol<CuDeviceGetCount> = lib.get(b"cuDeviceGetCount\0").ok()?;
        let get: Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").ok()?;
        let name_fn: Symbol<CuDeviceGetName> = lib.get(b"cuDeviceGetName\0").ok()?;
        if init(0) != 0 {
            return None;
        }
        let mut count: c_int = 0;
        if count_fn(&mut count) != 0 {
            return None;
        }
        let mut gpus = Vec::new();
        for ordinal in 0..count.max(0) {
            let mut dev: c_int = 0;
            if get(&mut dev, ordinal) != 0 {
                return None;
            }
            let mut buf = [0 as c_char; 256];
            let name = if name_fn(buf.as_mut_ptr(), buf.len() as c_int, dev) == 0 {
                std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                "unknown GPU".to_string()
            };
            gpus.push(GpuInfo { index: ordinal as u32, name });
        }
        Some(gpus)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_driver_means_no_gpus() {
        assert_eq!(super::detect_with("libcuda-that-does-not-exist.so.9"), None);
        // On a machine without a driver `detect` is empty; with one, every index is listed in order.
        for (i, g) in super::detect().iter().enumerate() {
            assert_eq!(g.index as usize, i);
        }
    }
}
