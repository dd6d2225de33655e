"""Summarise cpu_sample.py output: for processes whose command contains each KEY, while they train (> 0.8 core),
the mean minor page faults/s, system CPU and per-thread CPU and context switches.

    python tests/bench/tools/cpu_summary.py OUT.jsonl KEY [KEY ...]
"""
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
for key in sys.argv[2:]:
    per = collections.defaultdict(lambda: [0.0, 0, 0, 0]); n = 0; procflt = 0; sysc = 0
    for a, b in zip(rows, rows[1:]):
        dt = b["t"] - a["t"]; pa = {p["pid"]: p for p in a["procs"]}
        for p in b["procs"]:
            if key in p["cmd"] and p["pid"] in pa:
                q = pa[p["pid"]]
                if (p["cpu"] - q["cpu"]) / dt < 0.8: continue
                n += 1; procflt += (p["minflt"] - q["minflt"]) / dt; sysc += (p["sys"] - q["sys"]) / dt
                for k, v in p.get("threads", {}).items():
                    v0 = q.get("threads", {}).get(k)
                    if v0 is not None:
                        for i in range(4): per[k][i] += (v[i] - v0[i]) / dt
    print(f"== {key}: {n} samples, minor faults/s {procflt/max(n,1):,.0f}, system CPU {sysc/max(n,1):.3f} cores")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])[:5]:
        print(f"   {k:28s} cpu {v[0]/n:.3f}  vol/s {v[1]/n:8.0f}  invol/s {v[2]/n:6.0f}  minflt/s {v[3]/n:8.0f}")
