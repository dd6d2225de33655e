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


NAMES = ["preprocess", "train", "memory", "tune", "tune-cost", "generate", "train-data", "gpu-plan", "lora"]
ORDER = ["preprocess", "train_data", "train", "memory_bf16", "memory_fp32", "lora", "tune", "tune_cost", "generate", "gpu_plan"]


def run_benchmark(name: str, command: str, *, config: str | None = None, overrides: list[str] = (),
                  repeats: int | None = None, glue_dir: Path | None = None, stages: str = "0,1,2,3", workers: str = "1,2",
                  precision: str = "bf16") -> tuple[str, dict[str, Any], str]:
    """Run benchmark `name` (one of NAMES); (result name, JSON-able result, Markdown)."""
    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    name = name.replace("-", "_")
    if name == "preprocess":
        from pipeline.benchmarks import preprocess
        if glue_dir is None or not (glue_dir / "SST-2" / "train.tsv").is_file():
            raise PipelineError.one("--glue-dir", f"no SST-2/train.tsv under {glue_dir}",
                                    "pass the GLUE folder (the standard layout: SST-2/train.tsv)")
        result, md = preprocess.run(glue_dir.resolve(), command, repeats=repeats or 3)
    elif name == "train":
        from pipeline.benchmarks import train
        cfg = load_config(config or "jobs/configs/bench_train.yaml", list(overrides))
        result, md = train.run(cfg, command, stages=tuple(int(s) for s in stages.split(",")),
                               workers=tuple(int(w) for w in workers.split(",")), repeats=repeats or 1)
    elif name == "memory":
        from pipeline.benchmarks import memory
        result, md = memory.run(command, precision=precision)
        name = f"memory_{precision}"
    elif name == "tune":
        from pipeline.benchmarks import tune
        result, md = tune.run(command, extra=list(overrides))
    elif name == "tune_cost":
        from pipeline.benchmarks import tune
        result, md = tune.run_cost(command, repeats=repeats or 1, extra=list(overrides))
    elif name == "generate":
        from pipeline.benchmarks import generate
        result, md = generate.run(command, repeats=repeats or 3)
    elif name == "lora":
        from pipeline.benchmarks import lora
        result, md = lora.run(command)
    elif name == "train_data":
        from pipeline.benchmarks import train_data
        cfg = load_config(config or "jobs/configs/default.yaml", list(overrides))
        result, md = train_data.run(cfg, command, repeats=repeats or 3)
    else:
        from pipeline.benchmarks import gpu_plan
        result, md = gpu_plan.run(command)
    return name, result, md


def write_index(out: Path) -> Path:
    """tests/bench/RESULTS.md: every benchmark's latest table, in a fixed order."""
    parts = ["# Benchmark results", "",
             "Each section is the latest output of `python jobs/benchmark.py <name>` (the command is in it); the "
             "JSON beside each holds every number. Both sides of a comparison run in the same invocation.", ""]
    for name in ORDER:
        md = out / f"{name}.md"
        if md.is_file():
            parts += [md.read_text().replace("# Benchmark:", "## Benchmark:", 1), ""]
    index = out.parent / "RESULTS.md" if out.resolve() == RESULTS.resolve() else out / "RESULTS.md"
    index.write_text("\n".join(parts))
    return index


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


def cost_label(key: str) -> str:
    """A fixed-cost metric's column title: `startup/data_and_eval_s` -> `data and eval`."""
    return key.split("/", 1)[1].removesuffix("_s").replace("_", " ")


WORKER_GROUP_TEXT = ("worker process: Ray Train's controller, the placement group and the actor until its process "
                     "exists; imports: the process's Python start and the training module's imports; backend: Ray "
                     "Train's worker set-up and the torch process group")
