"""The training benchmark's job side alone, four variants in rounds whose order rotates (default, switch, idle,
both, then switch, idle, both, default, ...), to see whether Ray's processes beside the training worker cost it
throughput on a machine whose every core trains:

- `idle`: every Ray process but the training worker (raylet, GCS, dashboard, Ray Train's and Ray Data's helper
  actors, pooled workers) is switched to SCHED_IDLE while the job runs, so their wake-ups no longer preempt the
  training threads (re-applied every 0.2 s; the training worker is put back to SCHED_OTHER if it was set while
  still a pooled worker);
- `switch`: the worker's `sys.setswitchinterval(0.1)` (Python's default is 0.005 s), so the actor's main thread,
  which Ray wakes every 10 ms to check signals, forces the GIL from the training thread less often. This
  variant needs a temporary two-line patch to `Worker.__init__` that reads /tmp/mtl_switch (see the results'
  README); the tool refuses to start without it;
- `both`.

    python tests/bench/tools/helpers_ab.py jobs/configs/bench_train_short.yaml 1 4 OUT.jsonl data.glue_dir=GLUE
"""
import json, os, sys, threading, time
from pathlib import Path

from threads import is_ray  # tests/bench/tools/threads.py: what counts as a Ray process

def _threads(pid: str) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # the process has exited
        return []


def _unidle(pid: str) -> None:
    """Every thread of `pid` that is SCHED_IDLE back to SCHED_OTHER."""
    for tid in _threads(pid):
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass


def idle_others(stop: threading.Event) -> None:
    """Until `stop`: every Ray process but the training worker SCHED_IDLE, rescanned every 0.2 s."""
    done = set()
    while not stop.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if int(pid) == os.getpid() or not is_ray(cmd):
                continue
            if cmd.startswith("ray::RayTrainWorker"):  # it may have been set idle while it was a pooled ray::IDLE
                _unidle(pid)
                continue
            for tid in _threads(pid):
                if (pid, tid) not in done:
                    try:
                        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                        done.add((pid, tid))
                    except OSError:
                        pass
        stop.wait(0.2)


def main(config, workers, rounds, out, overrides):
    from pipeline.benchmarks.train import job_side, ms_per_k_tokens, per_process
    from pipeline.config import load_config
    from pipeline.runtime import init_ray
    patched = "/tmp/mtl_switch" in (Path(__file__).resolve().parents[3] / "pipeline/train/loop.py").read_text()
    if not patched:
        sys.exit("error: the `switch` and `both` variants need the two-line patch to Worker.__init__ shown in "
                 "tests/bench/results/train_helpers_ab/README.md — fix: apply it to the working tree first "
                 "(without it those variants would silently run as `default`)")
    init_ray()
    cfg = per_process(load_config(config, overrides), workers)
    variants = ["default", "switch", "idle", "both"]
    for r in range(rounds):
        order = variants[r % 4:] + variants[:r % 4]
        for v in order:
            if v in ("switch", "both"): open("/tmp/mtl_switch", "w").write("0.1")
            elif os.path.exists("/tmp/mtl_switch"): os.remove("/tmp/mtl_switch")
            stop = threading.Event(); th = None
            if v in ("idle", "both"):
                th = threading.Thread(target=idle_others, args=(stop,), daemon=True); th.start()
            side = job_side(cfg)
            stop.set()
            if th: th.join()
            for pid in filter(str.isdigit, os.listdir("/proc")):  # back to normal for the next run
                _unidle(pid)
            rec = {"round": r, "variant": v, "tokens_per_s": side["tokens_per_s"], "cpu_use": side["cpu_use"],
                   "steps_per_s": cfg.train.log_every * len(side["windows"]) / side["measured_s"],
                   "ms_per_k": ms_per_k_tokens(side), "t": time.strftime("%H:%M:%S")}
            with open(out, "a") as f: f.write(json.dumps(rec) + "\n")
            print(r, v, round(side["tokens_per_s"]), flush=True)

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
