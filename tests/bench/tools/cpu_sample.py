"""Sample CPU time, page faults and context switches of every process every 2 s to JSONL while a benchmark
runs (where the CPU goes: Ray daemons, helper actors, the training processes and their threads).

    python tests/bench/tools/cpu_sample.py OUT.jsonl &   # then: python tests/bench/tools/cpu_summary.py OUT.jsonl benchmark.py torchrun_side RayTrainWorker
"""
import json, os, time, psutil, sys
out = open(sys.argv[1], "a"); tck = os.sysconf("SC_CLK_TCK")
while True:
    t = time.time(); rows = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            ct = p.info["cpu_times"]; cmd = " ".join(p.info["cmdline"] or [])[:160]
            if ct is None or (ct.user + ct.system) < 0.05: continue
            f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
            row = {"pid": p.pid, "name": p.info["name"], "cmd": cmd, "cpu": ct.user + ct.system, "sys": ct.system, "minflt": int(f[7])}
            if cmd.startswith("ray::RayTrain") or "torchrun_side" in cmd or "benchmark.py" in cmd:
                th = {}
                for tid in os.listdir(f"/proc/{p.pid}/task"):
                    try:
                        comm = open(f"/proc/{p.pid}/task/{tid}/comm").read().strip()
                        f = open(f"/proc/{p.pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                        st = open(f"/proc/{p.pid}/task/{tid}/status").read()
                        vol = int(st.split("voluntary_ctxt_switches:")[1].split()[0]); inv = int(st.split("nonvoluntary_ctxt_switches:")[1].split()[0])
                        th[f"{tid}:{comm}"] = [(int(f[11]) + int(f[12])) / tck, vol, inv, int(f[7])]
                    except (OSError, IndexError): pass
                row["threads"] = th
            rows.append(row)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError): pass
    out.write(json.dumps({"t": t, "procs": rows}) + "\n"); out.flush()
    time.sleep(2)
