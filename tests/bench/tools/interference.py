"""How much a small background CPU load slows the training benchmark's plain loop (2 intra-op threads on 2
cores): is the job side's slower compute (every phase ~25% slower than torchrun's on short rows, with Ray's
daemons and helper actors running beside it) what a few percent of a core taken at random moments costs a
loop whose two threads meet at a barrier after every operator?

    python tests/bench/tools/interference.py jobs/configs/bench_train_short.yaml none,10ms:5%,100ms:5%,none OUT.jsonl data.glue_dir=GLUE

Arguments: config, comma-separated loads (`none`, or PERIOD:SHARE: a process that spins for SHARE of every
PERIOD, e.g. `10ms:5%` = 0.5 ms of one core every 10 ms), the JSONL file each measurement is appended to
(tokens/s: median of the windows after the first; CPU use of the loop; the load's own measured CPU), then
config overrides. Loads run one after another; repeat `none` between them to see the machine's drift.
"""
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path


def spin(period_s: float, share: float, stop) -> None:
    busy = period_s * share
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy:
            pass
        time.sleep(max(0.0, period_s - (time.perf_counter() - t0)))


def parse(load: str) -> tuple[float, float] | None:
    if load == "none":
        return None
    period, share = load.split(":")
    return float(period.removesuffix("ms")) / 1000, float(share.removesuffix("%")) / 100


def main(config: str, loads: list[str], out: Path, overrides: list[str]) -> None:
    from pipeline.benchmarks.train import per_process, plain_loop, workload
    from pipeline.config import load_config
    from pipeline.runtime import quiet_libraries

    quiet_libraries()
    base = per_process(load_config(config, overrides), 1)
    prepared, ratios, weights = workload(base)
    for load in loads:
        spec, proc, stop = parse(load), None, mp.Event()
        if spec:
            proc = mp.Process(target=spin, args=(*spec, stop), daemon=True)
            proc.start()
            t0 = time.time()
        side = plain_loop(base, prepared, ratios, weights)
        load_cores = None
        if proc:
            import psutil
            ct = psutil.Process(proc.pid).cpu_times()
            load_cores = (ct.user + ct.system) / (time.time() - t0)
            stop.set()
            proc.join()
        rec = {"load": load, "tokens_per_s": side["tokens_per_s"], "cpu_use": side["cpu_use"],
               "load_cores": load_cores, "pid": os.getpid(), "t": time.strftime("%H:%M:%S")}
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3]), sys.argv[4:])
