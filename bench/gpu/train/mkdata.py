import json, random, sys
# ids corpus: N lines of L random token ids below V
out, n, l, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(7)
with open(out, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"input_ids": [r.randrange(v) for _ in range(l)]}) + "\n")
