"""Splits torch_baseline.py's step: forward+backward alone, and the fused AdamW step alone.

Same model construction as torch_baseline.py (its CONFIGS are imported from the copy beside this file), so the
qcluster train-step (forward+backward, no optimizer) can be compared with torch on the same work.
Usage: python3 torch_fwd_bwd.py NAME SEQ MBS STEPS
"""
import json, os, sys, time
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import CONFIGS  # noqa: E402


def main():
    name, seq, mbs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from transformers import Qwen3Config, Qwen3ForCausalLM
    h, L, nh, nkv, hd, ff, V, tie = CONFIGS[name]
    cfg = Qwen3Config(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv,
                      head_dim=hd, intermediate_size=ff, vocab_size=V, tie_word_embeddings=tie,
                      max_position_embeddings=max(seq, 4096), rope_theta=1000000.0, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    x = torch.randint(0, V, (mbs, seq), device="cuda")

    def fb():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        return out.loss

    for _ in range(3):
        fb()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = fb()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    dopt = (time.perf_counter() - t0) / steps
    print(json.dumps({"system": "torch-eager fwd+bwd only (zero_grad set_to_none, bf16 grads)", "model": name,
                      "seq": seq, "mbs": mbs, "fwd_bwd_step_s": round(dt, 4), "tokens_per_s": round(mbs * seq / dt),
                      "fused_adamw_step_s": round(dopt, 5), "peak_mem_gib_fwd_bwd": round(peak, 1),
                      "loss": float(loss)}), flush=True)


if __name__ == "__main__":
    main()
