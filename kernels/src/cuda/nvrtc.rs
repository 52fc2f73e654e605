//! Run-time compilation of the CUDA C sources in `kernels/cuda/` with NVRTC, cached on disk.
//!
//! Each source is one module; [`SOURCES`] lists them. The text compiled is `common.cuh` followed by the source.
//! Output is a CUBIN for the exact target (`sm_90a` on H100/H200, read from the device), so the driver does no
//! JIT at load time.
//!
//! Cache: `<dir>/<hash>.cubin`, the hash being FNV-1a 64 over the source text, the options and the NVRTC
//! version. `<dir>` is `$QCLUSTER_NVRTC_CACHE`, else `$XDG_CACHE_HOME/qcluster/nvrtc`, else
//! `$HOME/.cache/qcluster/nvrtc`. Files are written to a temporary name and renamed, so concurrent ranks never
//! read half a file. A cache that cannot be written is skipped silently (compilation still works).
//!
//! `QCLUSTER_NVRTC_VERBOSE=1` adds `--ptxas-options=-v` (registers, spills, shared memory per kernel in the log).
//!
//! Libraries and headers: `libnvrtc.so` (and `libnvrtc-builtins.so` beside it) are found through the dynamic
//! loader (`LD_LIBRARY_PATH`); the sources include `cuda_bf16.h`, looked up in this order, first directory
//! holding it wins:
//! 1. `$QCLUSTER_CUDA_INCLUDE`
//! 2. `$CUDA_HOME/include`, then `$CUDA_PATH/include`
//! 3. `/usr/local/cuda/include`
//! 4. for every entry `D` of `LD_LIBRARY_PATH`: `D/../include` — this finds the include folder of the pip wheels
//!    (`…/site-packages/nvidia/cu13/lib` → `…/nvidia/cu13/include`, from `nvidia-cuda-runtime`).

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::result as nr;
use cudarc::nvrtc::sys as ns;

use super::CudaError;
use crate::error::{KernelError, Result};

/// In-process cache: `(module, arch)` → CUBIN.
type ImageCache = HashMap<(String, String), Vec<u8>>;

/// Prelude prepended to every source.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// `(module name, source text)` of every kernel source.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../cuda/elementwise.cu")),
    ("rmsnorm", include_str!("../../cuda/rmsnorm.cu")),
    ("rope", include_str!("../../cuda/rope.cu")),
    ("swiglu", include_str!("../../cuda/swiglu.cu")),
    ("embedding", include_str!("../../cuda/embedding.cu")),
    ("cross_entropy", include_str!("../../cuda/cross_entropy.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
    ("attention_tc", include_str!("../../cuda/attention_tc.cu")),
    ("moe", include_str!("../../cuda/moe.cu")),
    ("optim", include_str!("../../cuda/optim.cu")),
    ("router", include_str!("../../cuda/router.cu")),
    (
        "paged_attention",
        include_str!("../../cuda/paged_attention.cu"),
    ),
    ("argmax", include_str!("../../cuda/argmax.cu")),
];

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The directories searched for `cuda_bf16.h`, in order (see the module docs).
pub fn include_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("QCLUSTER_CUDA_INCLUDE") {
        v.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            v.push(Path::new(&p).join("include"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/include"));
    if let Ok(lp) = std::env::var("LD_LIBRARY_PATH") {
        for d in lp.split(':').filter(|d| !d.is_empty()) {
            v.push(Path::new(d).join("..").join("include"));
        }
    }
    v
}

/// The first include directory that holds `cuda_bf16.h`.
pub fn find_include_dir() -> Result<PathBuf> {
    let cands = include_candidates();
    cands
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| {
            KernelError::Cuda(CudaError::Missing(format!(
                "cuda_bf16.h not found; searched {cands:?}. Set QCLUSTER_CUDA_INCLUDE or CUDA_HOME, or put the \
                 lib folder of the nvidia-cuda-runtime wheel on LD_LIBRARY_PATH"
            )))
        })
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QCLUSTER_NVRTC_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("XDG_CACHE_HOME") {
        return Some(Path::new(&p).join("qcluster").join("nvrtc"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| Path::new(&h).join(".cache").join("qcluster").join("nvrtc"))
}

/// `(major, minor)` of the loaded NVRTC.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut ma, mut mi) = (0, 0);
    // SAFETY: both out-pointers are valid for writes.
    unsafe { ns::nvrtcVersion(&mut ma, &mut mi) }
        .result()
        .map_err(CudaError::from)?;
    Ok((ma, mi))
}

fn ensure_nvrtc() -> Result<()> {
    if super::nvrtc_present() {
        Ok(())
    } else {
        Err(KernelError::Cuda(CudaError::Missing(
            "libnvrtc.so cannot be loaded: install CUDA 13 or the nvidia-cuda-nvrtc wheel and put its lib folder \
             on LD_LIBRARY_PATH"
                .into(),
        )))
    }
}

fn source(module: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == module)
        .map(|(_, s)| *s)
        .ok_or_else(|| KernelError::Cuda(CudaError::Missing(format!("no kernel source {module}"))))
}

/// Compiles `module` for `arch` (e.g. `sm_90a`) to a CUBIN, uncached. Returns the image and NVRTC's log.
pub fn compile(module: &str, arch: &str) -> Result<(Vec<u8>, String)> {
    ensure_nvrtc()?;
    let inc = find_include_dir()?;
    let text = format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{module}.cu\"\n{}",
        source(module)?
    );
    let opts = options(arch, &inc);
    compile_text(module, arch, &text, &opts)
}

fn options(arch: &str, inc: &Path) -> Vec<String> {
    let mut v = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        format!("--include-path={}", inc.display()),
        "--device-as-default-execution-space".into(),
    ];
    // Registers, spills and shared memory per kernel in the program log (printed by the NVRTC test).
    if std::env::var("QCLUSTER_NVRTC_VERBOSE").is_ok_and(|x| x == "1") {
        v.push("--ptxas-options=-v".into());
    }
    v
}

fn compile_text(
    module: &str,
    arch: &str,
    text: &str,
    opts: &[String],
) -> Result<(Vec<u8>, String)> {
    let src = CString::new(text).expect("sources have no NUL");
    let name = CString::new(format!("{module}.cu")).expect("no NUL");
    let prog = nr::create_program(&src, Some(&name)).map_err(CudaError::from)?;
    // SAFETY: `prog` was just created and is destroyed exactly once below; `src`/`name` outlive it.
    let res = unsafe { nr::compile_program(prog, opts) };
    // SAFETY: as above.
    let log = unsafe { nr::get_program_log(prog) }
        .map(|v| {
            let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let out = match res {
        Err(_) => Err(KernelError::Cuda(CudaError::Compile {
            source_name: format!("{module}.cu"),
            arch: arch.into(),
            log: log.clone(),
        })),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is valid for writes and the buffer has `size` bytes.
            unsafe {
                ns::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(CudaError::from)?;
                let mut buf = vec![0u8; size];
                ns::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
                    .result()
                    .map_err(CudaError::from)?;
                Ok((buf, log))
            }
        }
    };
    // SAFETY: destroyed once; nothing uses `prog` afterwards.
    let _ = unsafe { nr::destroy_program(prog) };
    out
}

/// The CUBIN of `module` for `arch`, from the in-process cache, the disk cache, or a fresh compile.
pub fn compile_cached(module: &'static str, arch: &str) -> Result<Vec<u8>> {
    static MEM: OnceLock<Mutex<ImageCache>> = OnceLock::new();
    let mem = MEM.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (module.to_string(), arch.to_string());
    if let Some(img) = mem.lock().expect("nvrtc cache poisoned").get(&key) {
        return Ok(img.clone());
    }
    ensure_nvrtc()?;
    let inc = find_include_dir()?;
    let text = format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{module}.cu\"\n{}",
        source(module)?
    );
    let opts = options(arch, &inc);
    let (ma, mi) = nvrtc_version()?;
    let ver = format!("{ma}.{mi}");
    // The include path is left out of the hash (it differs between machines with the same headers).
    let opt_key: Vec<&String> = opts
        .iter()
        .filter(|o| !o.starts_with("--include-path"))
        .collect();
    let opt_text = format!("{opt_key:?}");
    let hash = fnv1a(&[text.as_bytes(), opt_text.as_bytes(), ver.as_bytes()]);
    let file = cache_dir().map(|d| d.join(format!("{module}-{hash:016x}.cubin")));
    if let Some(f) = &file
        && let Ok(img) = std::fs::read(f)
        && !img.is_empty()
    {
        mem.lock()
            .expect("nvrtc cache poisoned")
            .insert(key, img.clone());
        return Ok(img);
    }
    let (img, _log) = compile_text(module, arch, &text, &opts)?;
    if let Some(f) = &file
        && let Some(dir) = f.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &img).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    mem.lock()
        .expect("nvrtc cache poisoned")
        .insert(key, img.clone());
    Ok(img)
}

/// Compiles every source for `arch` (no cache); returns `(module, cubin bytes, log)` per source, or the first
/// failure. The CI check runs this with `sm_90a` on a machine without a GPU.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize, String)>> {
    SOURCES
        .iter()
        .map(|(m, _)| compile(m, arch).map(|(img, log)| (*m, img.len(), log)))
        .collect()
}
