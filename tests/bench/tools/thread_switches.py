"""One process's threads over SECONDS: CPU (cores), voluntary and involuntary context switches per second and
the CPU each last ran on, plus the thread-pool and allocator variables in its environment. PATTERN picks the
first process whose command line contains it (torchrun's launcher excluded).

    python tests/bench/tools/thread_switches.py "ray::RayTrainWorker" 20      # while the job side trains
    python tests/bench/tools/thread_switches.py pipeline.benchmarks.torchrun_side 20
"""
import os, sys, time
pat = sys.argv[1]; secs = float(sys.argv[2]); tck = os.sysconf("SC_CLK_TCK")
def find():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                c = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
                if pat in c and "torch.distributed.run" not in c and "tid.py" not in c: return pid
            except OSError: pass
def snap(pid):
    d = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            st = open(f"/proc/{pid}/task/{tid}/status").read()
            d[tid] = ((int(f[11]) + int(f[12])) / tck, int(st.split("\nvoluntary_ctxt_switches:")[1].split()[0]), int(st.split("nonvoluntary_ctxt_switches:")[1].split()[0]), int(f[36]))
        except (OSError, IndexError): pass
    return d
pid = find(); a = snap(pid); t = time.time(); time.sleep(secs); b = snap(pid); dt = time.time() - t
print(pat, pid, "threads", len(b), open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:150])
env = open(f"/proc/{pid}/environ").read().split("\0")
print([e for e in env if any(k in e for k in ("OMP", "MKL", "KMP", "MALLOC", "PRELOAD", "GOMP", "TORCH"))])
for tid, v in sorted(b.items(), key=lambda kv: -(kv[1][0] - a.get(kv[0], kv[1])[0])):
    if tid in a:
        c = (v[0] - a[tid][0]) / dt
        if c > 0.001 or (v[1] - a[tid][1]) / dt > 20:
            print(f"  tid {tid}: {c:.3f} cores  vol/s {(v[1]-a[tid][1])/dt:7.0f}  invol/s {(v[2]-a[tid][2])/dt:6.0f}  cpu#{v[3]}")
