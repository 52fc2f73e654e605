"""Times PyTorch SDPA causal GQA attention forward and backward at the train-step shapes, for comparison with the
`attention_fwd` / `attention_bwd` rows of `qcluster-gpu-bench train-step`'s breakdown (same FLOP counting:
forward 2·b·hq·s²·d for causal, backward 2.5× forward). CUDA events, median of 10 after 3 warm-ups.
Usage: python3 torch_attention.py B S HQ HKV D
"""
import json, sys
import torch
import torch.nn.functional as F


def med(f, n=10):
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[n // 2]


def main():
    b, s, hq, hkv, d = map(int, sys.argv[1:6])
    torch.manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
    fl = 2.0 * b * hq * s * s * d
    for variant in ["enable_gqa", "repeat_kv"]:
        def fwd():
            if variant == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            g = hq // hkv
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  is_causal=True)
        with torch.no_grad():
            tf = med(fwd)
        o = None

        def fb():
            q.grad = k.grad = v.grad = None
            fwd().backward(do)
        tfb = med(fb)
        tb = tfb - tf
        print(json.dumps({"system": "torch-sdpa", "variant": variant, "b": b, "s": s, "hq": hq, "hkv": hkv, "d": d,
                          "fwd_ms": round(tf * 1e3, 3), "bwd_ms_est": round(tb * 1e3, 3),
                          "fwd_tflops": round(fl / tf / 1e12), "bwd_tflops_est": round(2.5 * fl / tb / 1e12)}),
              flush=True)


if __name__ == "__main__":
    main()
