"""Benchmarks that run both sides in one invocation on the same machine (`jobs/benchmark.py <name>`).

Each returns a JSON-able result and a Markdown table; `write` puts them in `tests/bench/results/<name>.{json,md}`
together with the machine and the exact command. Benchmarks report numbers; they never assert on them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "tests" / "bench" / "results"


def machine() -> dict[str, Any]:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    import torch
    info = {"cpus": os.cpu_count(), "cpu": cpu or platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", {m['gpus']} × {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GiB{gpu}; Python {m['python']}, torch {m['torch']}"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write(name: str, result: dict[str, Any], markdown: str, out: Path | None = None) -> Path:
    out = Path(out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown)
    return out / f"{name}.md"


def header(title: str, command: str, m: dict[str, Any]) -> list[str]:
    return [f"# Benchmark: {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line(m)}.", ""]
