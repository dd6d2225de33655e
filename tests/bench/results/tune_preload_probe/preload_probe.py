"""Does Ray's `preload_python_modules` system setting take the imports out of a new actor's start-up?

    python tests/bench/results/tune_preload_probe/preload_probe.py on|off WAIT_S BETWEEN_S

Starts a local Ray (2 CPUs) with torch and deepspeed preloaded into its worker processes (`on`) or not (`off`),
waits WAIT_S, then creates four 1-CPU actors one after another (BETWEEN_S between them), each importing torch and
deepspeed in its constructor, and prints per actor: the time until it answered, whether torch was imported
before the constructor ran, the constructor's import time, the process's age and pid. A probe of Ray's worker
pool, kept beside its result (README.md); not part of the pipeline.
"""
import os, sys, time, ray, psutil
cfg = {"preload_python_modules": ["torch", "deepspeed"]} if sys.argv[1] == "on" else {}
ray.init(num_cpus=2, _system_config=cfg, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="WARNING"))
time.sleep(float(sys.argv[2]))
@ray.remote(num_cpus=1)
class A:
    def __init__(self):
        self.had = "torch" in sys.modules
        t = time.time(); import torch, deepspeed; self.imp = time.time() - t
        self.age = time.time() - psutil.Process().create_time()
    def info(self): return self.had, round(self.imp, 2), round(self.age, 1), os.getpid()
for i in range(4):
    t = time.time(); a = A.remote(); r = ray.get(a.info.remote()); print(i, "ready in %.1f s" % (time.time() - t), r, flush=True)
    ray.kill(a); time.sleep(float(sys.argv[3]))
