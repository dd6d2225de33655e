"""keep_freed_memory (pipeline/runtime.py): with it, a process that allocates and frees the same large block
at every step stops faulting its pages in again; with malloc_env's one arena, also when the steps run on another
thread than the main one (as Ray Train runs the training loop). Each side runs in a fresh interpreter (malloc
settings are per process and cannot be undone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.runtime import ARENA_MAX, KEEP_FREED_MEMORY, malloc_env

STEPS = """
import json, resource, sys
import numpy as np
from pipeline.runtime import keep_freed_memory
applied = keep_freed_memory()
def step():  # a forward's activations (40 blocks of 4 MiB alive together), written, then all freed
    blocks = [np.empty(1 << 19) for _ in range(40)]
    for b in blocks:
        b.fill(1.0)
    return sum(float(b[-1]) for b in blocks)
def steps(out):  # on this thread: its own page faults
    step()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(20):
        step()
    out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
out = {"applied": applied}
if sys.argv[1] == "thread":
    import threading
    t = threading.Thread(target=steps, args=(out,))
    t.start()
    t.join()
else:
    steps(out)
print(json.dumps(out))
"""


def _faults(where: str = "main", **env) -> dict:
    """The steps in a fresh interpreter, on its main thread or another; `env` on top of this process's environment
    without its malloc settings."""
    base = {k: v for k, v in os.environ.items() if k not in (ARENA_MAX, KEEP_FREED_MEMORY)}
    done = subprocess.run([sys.executable, "-c", STEPS, where], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default = _faults(MTL_KEEP_FREED_MEMORY="0")
    kept = _faults()
    assert default["applied"] is False and kept["applied"] is True
    pages = 20 * 40 * (4 << 20) // 4096  # every 4 KiB page of every step's blocks
    # glibc's default: the freed top of the heap (160 MiB) goes back to the OS, and the next step faults it in again
    assert default["faults"] > pages // 2, default
    assert kept["faults"] < pages // 20, kept  # kept: the first step's pages serve every later step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_a_training_thread_reuses_freed_blocks_with_one_arena(monkeypatch):
    monkeypatch.delenv(ARENA_MAX, raising=False)
    monkeypatch.delenv(KEEP_FREED_MEMORY, raising=False)
    pages = 20 * 40 * (4 << 20) // 4096
    # another thread than the main one has its own arena, whose freed 64 MiB heaps glibc unmaps whatever the
    # trim threshold: keep_freed_memory alone does not stop the faults there (measured: about 105k of 819k pages)
    alone = _faults("thread")
    assert alone["applied"] is True and alone["faults"] > pages // 20, alone
    one_arena = _faults("thread", **malloc_env())
    assert one_arena["faults"] < pages // 100, one_arena


def test_training_workers_get_one_malloc_arena_unless_told_otherwise(monkeypatch):
    from pipeline.eval.metrics import FAULT_METRIC
    from pipeline.runtime import VERBOSE
    from pipeline.train.driver import _worker_env
    for name in (ARENA_MAX, KEEP_FREED_MEMORY, FAULT_METRIC, VERBOSE):  # only what this test sets reaches the workers
        monkeypatch.delenv(name, raising=False)
    assert _worker_env() == {"env_vars": {ARENA_MAX: "1"}}
    monkeypatch.setenv(ARENA_MAX, "4")  # the user's own setting is passed on
    assert _worker_env() == {"env_vars": {ARENA_MAX: "4"}}
    monkeypatch.setenv(KEEP_FREED_MEMORY, "0")  # glibc's defaults, as keep_freed_memory then leaves them
    assert _worker_env() == {"env_vars": {KEEP_FREED_MEMORY: "0"}}
