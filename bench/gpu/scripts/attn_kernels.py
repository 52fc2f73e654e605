"""Checks and times qkernels' tensor-core attention (kernels/cuda/attention_tc.cu) against PyTorch SDPA, in one
process on one GPU, with no Rust toolchain: the source is compiled with NVRTC (ctypes, sm_90a, the same text and
options as qkernels::cuda::nvrtc) and launched through the driver API on torch's tensors.

Correctness: ours and SDPA bf16 are both compared with SDPA on the same inputs upcast to f32 (out, dq, dk, dv;
norm-relative error; exit 1 above 1e-2). Timing: CUDA events, median of 11 samples of 10 back-to-back calls after 3
warm-ups (tensor maps are encoded once per tensor); FLOPs 2·b·hq·s²·d forward, 2.5× that backward (bench/RESULTS.md's
convention). Our backward time is dq + dkdv; the Dd = rowsum(dO∘O) pass (a memory-bound kernel in attention.cu) is
not included here but is in the Rust bench. SDPA's backward is (fwd+bwd) − fwd.

Usage: python3 attn_kernels.py [--quick | --profile] [-DDEFINE ...]   (run from anywhere; LD_LIBRARY_PATH must find
libnvrtc.so.13; headers from $QCLUSTER_CUDA_INCLUDE or /usr/local/cuda/include)
"""
import ctypes
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "..", "kernels", "cuda")


def compile_cubin(defines):
    nv = ctypes.CDLL("libnvrtc.so.13")
    text = ('#line 1 "common.cuh"\n' + open(os.path.join(SRC, "common.cuh")).read() +
            '\n#line 1 "attention_tc.cu"\n' + open(os.path.join(SRC, "attention_tc.cu")).read())
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"attention_tc.cu", 0, None, None) == 0
    inc = os.environ.get("QCLUSTER_CUDA_INCLUDE", "/usr/local/cuda/include")
    opts = ["--gpu-architecture=sm_90a", "--std=c++17", f"--include-path={inc}",
            "--device-as-default-execution-space", "--ptxas-options=-v"] + [f"-D{d}" for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    log = log.value.decode()
    if rc != 0:
        raise RuntimeError("NVRTC failed:\n" + log)
    for line in log.splitlines():
        if "Used" in line or "spill" in line or "Potential" in line or "entry function" in line:
            print("  ptxas:", line.strip(), flush=True)
    nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cub = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetCUBIN(prog, cub)
    return cub.raw


cu = ctypes.CDLL("libcuda.so.1")
cu.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p,
                                                                          ctypes.c_void_p]
cu.cuModuleGetFunction.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
cu.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
cu.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]


_maps = {}


def tmap(t, rows):
    """CUtensorMap of a contiguous [B, S, H, D] bf16 tensor, boxes of 64 columns x `rows` rows, 128-byte swizzle
    (memoized on the address, shape and box, so timing loops do not pay for the encoding)."""
    key = (t.data_ptr(), tuple(t.shape), rows)
    if key not in _maps:
        _maps[key] = _tmap(t, rows)
    return _maps[key]


def _tmap(t, rows):
    B, S, H, D = t.shape
    buf = (ctypes.c_uint8 * 256)()
    addr = (ctypes.addressof(buf) + 127) & ~127
    dims = (ctypes.c_uint64 * 4)(D, H, S, B)
    strides = (ctypes.c_uint64 * 3)(D * 2, H * D * 2, S * H * D * 2)
    box = (ctypes.c_uint32 * 4)(64, 1, rows, 1)
    es = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    # BFLOAT16 = 9, INTERLEAVE_NONE = 0, SWIZZLE_128B = 3, L2_PROMOTION_128B = 2, OOB_FILL_NONE = 0
    ck(cu.cuTensorMapEncodeTiled(addr, 9, 4, t.data_ptr(), dims, strides, box, es, 0, 3, 2, 0), "cuTensorMapEncodeTiled")
    m = (ctypes.c_uint64 * 16)()
    ctypes.memmove(m, addr, 128)
    return m


def ck(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what}: CUresult {rc}")


class Module:
    def __init__(self, cubin):
        torch.zeros(1, device="cuda")  # torch's primary context is current from here on
        self.m = ctypes.c_void_p()
        ck(cu.cuModuleLoadData(ctypes.byref(self.m), cubin), "cuModuleLoadData")
        self.fns = {}

    def fn(self, name, smem):
        if name not in self.fns:
            f = ctypes.c_void_p()
            ck(cu.cuModuleGetFunction(ctypes.byref(f), self.m, name.encode()), "cuModuleGetFunction " + name)
            ck(cu.cuFuncSetAttribute(f, 8, smem), "cuFuncSetAttribute " + name)  # max dynamic smem
            self.fns[name] = f
        return self.fns[name]

    def launch(self, name, grid, block, smem, args):
        f = self.fn(name, smem)
        cargs = []
        for a in args:
            if isinstance(a, ctypes.Array):
                cargs.append(a)
            elif isinstance(a, torch.Tensor):
                cargs.append(ctypes.c_uint64(a.data_ptr()))
            elif a is None:
                cargs.append(ctypes.c_uint64(0))
            elif isinstance(a, float):
                cargs.append(ctypes.c_float(a))
            else:
                cargs.append(ctypes.c_int32(a))
        ptrs = (ctypes.c_void_p * len(cargs))(*[ctypes.cast(ctypes.pointer(c), ctypes.c_void_p) for c in cargs])
        st = torch.cuda.current_stream().cuda_stream
        ck(cu.cuLaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, smem, st, ptrs, None), "launch " + name)


def smem(kind, d):
    """Dynamic shared memory of each kernel (as in kernels/src/cuda/ops.rs)."""
    if kind == "fwd":
        return 1024 + 128 * d * 2 + 3 * 2 * 128 * d * 2 + 8 * 7
    if kind == "dq":
        return 1024 + 2 * 128 * d * 2 + 2 * 2 * 128 * d * 2 + 8 * 5
    return 1024 + 2 * 128 * d * 2 + 2 * 2 * 64 * d * 2 + 8 * 5 + 2 * 3 * 64 * 4


def ours_fwd(m, q, k, v):
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device="cuda", dtype=torch.float32)
    m.launch(f"attn_fwd_tc_d{d}", (b * hq, (s + 127) // 128, 1), 384, smem("fwd", d),
             [tmap(q, 128), tmap(k, 128), tmap(v, 128), None, o, lse, s, hq, hkv, d, 1.0 / d ** 0.5])
    return o, lse


def ours_bwd(m, q, k, v, do, lse, dd, parts=("dq", "dkdv")):
    """dq and dkdv kernels; Dd = rowsum(dO∘O) is given (the Rust op computes it with attention.cu's dot kernel)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sc = 1.0 / d ** 0.5
    if "dq" in parts:
        m.launch(f"attn_bwd_dq_tc_d{d}", (b * hq, (s + 127) // 128, 1), 384, smem("dq", d),
                 [tmap(q, 128), tmap(k, 128), tmap(v, 128), tmap(do, 128), None, lse, dd, dq, s, hq, hkv, d, sc])
    if "dkdv" in parts:
        m.launch(f"attn_bwd_dkdv_tc_d{d}", (b * hkv, (s + 127) // 128, 1), 384, smem("dkdv", d),
                 [tmap(q, 64), tmap(k, 128), tmap(v, 128), tmap(do, 64), None, lse, dd, dk, dv, s, hq, hkv, d, sc])
    return dq, dk, dv


def med(f, n=11, inner=10):
    """Median over n samples of the mean time of `inner` back-to-back calls (so host launch gaps hide behind the
    GPU queue)."""
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / inner)
    ts.sort()
    return ts[n // 2]


def rel(a, b):
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def main():
    args = sys.argv[1:]
    quick = "--quick" in args  # correctness only, small shapes
    profile = "--profile" in args  # each kernel twice at b1 s4096 hq32 hkv8 d128, nothing else (for ncu)
    defines = [a[2:] for a in args if a.startswith("-D")]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, defines {defines}", flush=True)
    m = Module(compile_cubin(defines))
    torch.manual_seed(0)
    if profile:
        b, s, hq, hkv, d = 1, 4096, 32, 8, 128
        q, do = (torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        o, lse = ours_fwd(m, q, k, v)
        dd = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        for _ in range(2):
            ours_fwd(m, q, k, v)
            ours_bwd(m, q, k, v, do, lse, dd)
        torch.cuda.synchronize()
        return
    shapes = [(4, 4096, 16, 8, 128, True), (2, 4096, 16, 8, 128, True), (1, 4096, 32, 8, 128, True),
              (1, 8192, 32, 8, 128, True), (1, 4096, 32, 8, 64, True), (1, 1000, 8, 2, 128, False),
              (2, 333, 4, 4, 64, False)]
    if quick:
        shapes = shapes[-2:]
    rows = []
    for (b, s, hq, hkv, d, timed) in shapes:
        q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
        do = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
        # f32 reference through SDPA on upcast inputs ([B, H, S, D]).
        qf, kf, vf = (t.float().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)
        of.backward(do.float().transpose(1, 2))
        ref = {"out": of.detach().transpose(1, 2), "dq": qf.grad.transpose(1, 2), "dk": kf.grad.transpose(1, 2),
               "dv": vf.grad.transpose(1, 2)}
        del qf, kf, vf, of
        # SDPA bf16 on contiguous [B, H, S, D].
        qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        ot.backward(dot)
        row = {"b": b, "s": s, "hq": hq, "hkv": hkv, "d": d}
        row["sdpa_err"] = {"out": rel(ot.transpose(1, 2), ref["out"]), "dq": rel(qt.grad.transpose(1, 2), ref["dq"]),
                           "dk": rel(kt.grad.transpose(1, 2), ref["dk"]),
                           "dv": rel(vt.grad.transpose(1, 2), ref["dv"])}
        fl = 2.0 * b * hq * s * s * d
        o, lse = ours_fwd(m, q, k, v)
        dd = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        dq, dk, dv = ours_bwd(m, q, k, v, do, lse, dd)
        torch.cuda.synchronize()
        row["err"] = {"out": rel(o, ref["out"]), "dq": rel(dq, ref["dq"]), "dk": rel(dk, ref["dk"]),
                      "dv": rel(dv, ref["dv"])}
        if timed:
            tf = med(lambda: ours_fwd(m, q, k, v))
            tb = med(lambda: ours_bwd(m, q, k, v, do, lse, dd))
            tq = med(lambda: ours_bwd(m, q, k, v, do, lse, dd, ("dq",)))
            tkv = med(lambda: ours_bwd(m, q, k, v, do, lse, dd, ("dkdv",)))

            def sf():
                with torch.no_grad():
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

            def sfb():
                qt.grad = kt.grad = vt.grad = None
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).backward(dot)

            tsf = med(sf)
            tsb = med(sfb) - tsf
            row.update(fwd_ms=round(tf * 1e3, 3), fwd_tflops=round(fl / tf / 1e12, 1),
                       bwd_ms=round(tb * 1e3, 3), bwd_tflops=round(2.5 * fl / tb / 1e12, 1),
                       dq_ms=round(tq * 1e3, 3), dkdv_ms=round(tkv * 1e3, 3),
                       sdpa_fwd_ms=round(tsf * 1e3, 3), sdpa_fwd_tflops=round(fl / tsf / 1e12, 1),
                       sdpa_bwd_ms=round(tsb * 1e3, 3), sdpa_bwd_tflops=round(2.5 * fl / tsb / 1e12, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, do, qt, kt, vt, dot, ot, ref
        _maps.clear()
        torch.cuda.empty_cache()
    print("\nshape (b,s,hq,hkv,d)   ours fwd ms (TFLOP/s)  ours bwd ms (TFLOP/s) | sdpa fwd ms (TFLOP/s)  "
          "sdpa bwd ms (TFLOP/s) | fwd ratio bwd ratio | max rel err ours (sdpa)")
    for r in rows:
        err = max(r["err"].values())
        serr = max(r["sdpa_err"].values())
        shape = f"{r['b']},{r['s']},{r['hq']},{r['hkv']},{r['d']}"
        if "fwd_ms" in r:
            print(f"{shape:<20} {r['fwd_ms']:>8.3f} ({r['fwd_tflops']:>5.0f}) {r['bwd_ms']:>13.3f} ({r['bwd_tflops']:>5.0f})"
                  f"   | {r['sdpa_fwd_ms']:>8.3f} ({r['sdpa_fwd_tflops']:>5.0f}) {r['sdpa_bwd_ms']:>13.3f} "
                  f"({r['sdpa_bwd_tflops']:>5.0f})   | {r['sdpa_fwd_ms'] / r['fwd_ms']:>8.2f}x "
                  f"{r['sdpa_bwd_ms'] / r['bwd_ms']:>8.2f}x | {err:.2e} ({serr:.2e})")
        else:
            print(f"{shape:<20} {'(correctness only)':>44}   | {'':>46}   | {'':>19} | {err:.2e} ({serr:.2e})")
    worst = max(max(r["err"].values()) for r in rows)
    if not worst < 1e-2:
        print(f"FAIL: max relative error {worst}")
        sys.exit(1)


if __name__ == "__main__":
    main()
