"""keep_freed_memory (pipeline/runtime.py): with it, a process that allocates and frees the same large block
at every step stops faulting its pages in again. Each side runs in a fresh interpreter (malloc settings are
per process and cannot be undone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS], env={**os.environ, **env}, capture_output=True, text=True,
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
