"""CPU and wake-ups per second of every thread of Ray's processes (daemons, helper actors, training workers)
over SECONDS, summed by (process title, thread name): which of Ray's processes wake how often beside training.

    python tests/bench/tools/thread_cpu.py SECONDS > threads.txt     # while a benchmark run trains
"""
import os, sys, time, collections
tck = os.sysconf("SC_CLK_TCK")
def snap():
    d = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:60]
            if not (cmd.startswith("ray::") or "ray/" in cmd or "dashboard" in cmd or "gcs" in cmd or "raylet" in cmd): continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                st = open(f"/proc/{pid}/task/{tid}/status").read()
                vol = int(st.split("voluntary_ctxt_switches:")[1].split()[0])
                d[(pid, tid)] = (cmd.split()[0][:40], comm, (int(f[11]) + int(f[12])) / tck, vol)
        except (OSError, IndexError): pass
    return d
a = snap(); t0 = time.time(); time.sleep(float(sys.argv[1])); b = snap(); dt = time.time() - t0
agg = collections.defaultdict(lambda: [0.0, 0])
for k, v in b.items():
    if k in a:
        agg[(v[0], v[1])][0] += (v[2] - a[k][2]) / dt; agg[(v[0], v[1])][1] += (v[3] - a[k][3]) / dt
for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])[:40]:
    if v[0] > 0.0005 or v[1] > 20: print(f"{v[0]:.4f} cores  wakeups/s {v[1]:7.1f}  {k[0]:40s} {k[1]}")
