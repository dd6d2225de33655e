"""Threads' CPU and context switches over SECONDS, read from /proc (where a machine's cores go beside training).

    python tests/bench/tools/threads.py ray SECONDS                  # every Ray process's threads, summed by (process title, thread name)
    python tests/bench/tools/threads.py process PATTERN SECONDS      # one process's threads, one row each

`ray`: CPU (cores) and wake-ups (voluntary context switches) per second of Ray's daemons, helper actors and
training workers: which of them wake how often beside training. `process`: the first process whose command line
contains PATTERN (torchrun's launcher excluded): per thread, CPU, voluntary and involuntary context switches per
second and the CPU it last ran on, plus the thread-pool and allocator variables of its environment.
"""
import collections
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def is_ray(cmd: str) -> bool:
    """Whether a /proc cmdline (NUL-separated) belongs to Ray: an actor or worker (`ray::…`), a daemon or the dashboard."""
    return cmd.startswith("ray::") or "ray" in cmd.split("\0")[0] or "/ray/" in cmd or "ray-dashboard" in cmd


def cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:  # the process has exited
        return ""


def thread_stats(pid: str) -> dict[str, tuple[str, float, int, int, int]]:
    """Per thread id: (name, CPU seconds, voluntary and involuntary context switches, CPU it last ran on)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:
            continue
        switches = [int(status.split(f"\n{k}_ctxt_switches:")[1].split()[0]) for k in ("voluntary", "nonvoluntary")]
        out[tid] = (name, (int(stat[11]) + int(stat[12])) / TICK, *switches, int(stat[36]))
    return out


def _rates(before: dict, after: dict, seconds: float) -> dict[str, tuple]:
    """Per thread present in both: (name, cores, voluntary/s, involuntary/s, last CPU)."""
    return {t: (v[0], *((v[i] - before[t][i]) / seconds for i in (1, 2, 3)), v[4]) for t, v in after.items() if t in before}


def ray_threads(seconds: float) -> None:
    def snap():
        return {pid: (cmdline(pid).split("\0")[0][:40], thread_stats(pid))
                for pid in filter(str.isdigit, os.listdir("/proc")) if is_ray(cmdline(pid))}
    a = snap(); start = time.time(); time.sleep(seconds); b = snap(); dt = time.time() - start
    total = collections.defaultdict(lambda: [0.0, 0.0])
    for pid, (title, threads) in b.items():
        for name, cores, vol, _, _ in _rates(a.get(pid, ("", {}))[1], threads, dt).values():
            total[(title, name)][0] += cores; total[(title, name)][1] += vol
    for (title, name), (cores, vol) in sorted(total.items(), key=lambda kv: -kv[1][0])[:40]:
        if cores > 0.0005 or vol > 20:
            print(f"{cores:.4f} cores  wakeups/s {vol:7.1f}  {title:40s} {name}")


def process_threads(pattern: str, seconds: float) -> None:
    me = str(os.getpid())
    pid = next((p for p in filter(str.isdigit, os.listdir("/proc")) if p != me and pattern in cmdline(p).replace("\0", " ")
                and "torch.distributed.run" not in cmdline(p)), None)
    if pid is None:
        sys.exit(f"error: no process whose command line contains {pattern!r} — fix: run this while it trains")
    a = thread_stats(pid); start = time.time(); time.sleep(seconds); b = thread_stats(pid); dt = time.time() - start
    print(pattern, pid, "threads", len(b), cmdline(pid).replace("\0", " ")[:150])
    env = open(f"/proc/{pid}/environ").read().split("\0")
    print([e for e in env if any(k in e for k in ("OMP", "MKL", "KMP", "MALLOC", "PRELOAD", "GOMP", "TORCH"))])
    for tid, (_, cores, vol, inv, cpu) in sorted(_rates(a, b, dt).items(), key=lambda kv: -kv[1][1]):
        if cores > 0.001 or vol > 20:
            print(f"  tid {tid}: {cores:.3f} cores  vol/s {vol:7.0f}  invol/s {inv:6.0f}  cpu#{cpu}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ray":
        ray_threads(float(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "process":
        process_threads(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(__doc__)
