import json, sys
# losses.py A/metrics.jsonl B/metrics.jsonl ... : loss per step side by side, max rel diff of each vs the first
runs = [[json.loads(l) for l in open(p)] for p in sys.argv[1:]]
for i, ms in enumerate(zip(*runs)):
    print(ms[0]["step"], " ".join(f"{m['loss']:.5f}" for m in ms), " ".join(f"{m['tokens_per_s']:.0f}" for m in ms))
for j, r in enumerate(runs[1:], 1):
    d = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(runs[0], r))
    tps = sorted(m["tokens_per_s"] for m in r[2:]) if len(r) > 3 else [0]
    print(f"{sys.argv[j+1]}: max rel loss diff vs {sys.argv[1]} = {d:.3e}; median tokens/s after 2 steps = {tps[len(tps)//2]:.0f}")
