//! Every CUDA C source of `kernels/cuda/` must compile under NVRTC for Hopper (`sm_90a`), on any machine.
//!
//! Needs `libnvrtc.so` (+ `libnvrtc-builtins.so`) loadable and `cuda_bf16.h` findable (lookup order in
//! `qkernels::cuda::nvrtc`); `.ci/nvrtc-check.sh` installs both from PyPI and runs this test. Without NVRTC the
//! test prints a `SKIPPED` line and returns (it cannot prove anything there). Set `QCLUSTER_REQUIRE_NVRTC=1` to
//! turn the skip into a failure (the CI script does).

use qkernels::cuda;

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    if !cuda::nvrtc_present() {
        let msg = "SKIPPED every_kernel_source_compiles_with_nvrtc: libnvrtc.so cannot be loaded \
                   (run .ci/nvrtc-check.sh, or put the nvidia-cuda-nvrtc wheel's lib folder on LD_LIBRARY_PATH)";
        if std::env::var("QCLUSTER_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("{msg}");
        println!("{msg}");
        return;
    }
    let (ma, mi) = cuda::nvrtc::nvrtc_version().expect("nvrtc version");
    let inc = cuda::nvrtc::find_include_dir().expect("cuda_bf16.h");
    eprintln!("NVRTC {ma}.{mi}, headers from {}", inc.display());
    for arch in ["sm_90a"] {
        let t = std::time::Instant::now();
        let all = cuda::nvrtc::compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), cuda::nvrtc::SOURCES.len());
        for (m, bytes, log) in &all {
            assert!(*bytes > 0, "{m}: empty CUBIN");
            eprintln!(
                "  {m}.cu -> {arch}: {bytes} B cubin{}",
                if log.trim().is_empty() {
                    String::new()
                } else {
                    format!("\n{log}")
                }
            );
        }
        eprintln!(
            "compiled {} sources for {arch} in {:.2?}",
            all.len(),
            t.elapsed()
        );
    }
}

#[test]
fn cuda_device_on_a_machine_without_one_is_a_typed_error() {
    if cuda::device_count() > 0 {
        eprintln!(
            "SKIPPED cuda_device_on_a_machine_without_one_is_a_typed_error: this machine has a GPU"
        );
        return;
    }
    let e = qkernels::Tensor::zeros(&[4], qkernels::DType::F32, &qkernels::Device::Cuda(0))
        .unwrap_err();
    assert!(
        matches!(e, qkernels::KernelError::DeviceUnavailable { .. }),
        "{e}"
    );
}
