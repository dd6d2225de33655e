"""Preprocessing: the project's Ray Data pipeline against `datasets.Dataset.map(batched=True, num_proc=2)`.

Equal work on both sides, end to end: read SST-2's train TSV (67,349 rows), tokenize every sentence with
the same tokenizer and length limit into the same ids (ours: `encode_texts`; theirs: the tokenizer's own
call, as a user writes it), write Parquet. Ours is `prepare_tasks` on a cold cache (a new cache folder each repetition) with Ray already
running — so it also normalises rows, records drop reasons and counts, and writes the manifest. Theirs is
what a user would write with `datasets`. Each side runs `repeats` times, alternating; medians are reported.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.benchmarks import header, machine, median


def _task_config(glue_dir: Path, model: str, max_length: int, cache_dir: Path, batch_rows: int):
    from pipeline.config import load_config
    task = ("{sst2_train: {define: {kind: classification, format: tsv, files: {train: '%s'}, "
            "columns: {text: sentence, label: label}, num_labels: 2}}}" % (glue_dir / "SST-2" / "train.tsv"))
    return load_config(None, ["name=bench-preprocess", f"model.name={model}", f"model.max_length={max_length}",
                              f"tasks={task}", f"data.cache_dir={cache_dir}", f"data.batch_rows={batch_rows}"])


def ours(glue_dir: Path, model: str, max_length: int, batch_rows: int) -> dict[str, Any]:
    from pipeline.data.preprocess import prepare_tasks
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-ours-"))
    try:
        cfg = _task_config(glue_dir, model, max_length, tmp, batch_rows)
        start = time.perf_counter()
        prepared = prepare_tasks(cfg, log=lambda _: None)["sst2_train"]
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rows": prepared.rows("train"), "cache_hit": prepared.cache_hit}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def theirs(glue_dir: Path, model: str, max_length: int, num_proc: int = 2) -> dict[str, Any]:
    import datasets
    import pandas as pd

    from pipeline.model.refs import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-theirs-"))
    try:
        start = time.perf_counter()
        frame = pd.read_csv(glue_dir / "SST-2" / "train.tsv", sep="\t", quoting=3, keep_default_na=False)
        ds = datasets.Dataset.from_pandas(frame)

        def tokenize(batch):  # what a user writes: the tokenizer's own call, same length limit and outputs
            return tok(batch["sentence"], truncation=True, max_length=max_length, return_attention_mask=False)

        ds = ds.map(tokenize, batched=True, num_proc=num_proc, load_from_cache_file=False)
        ds.to_parquet(str(tmp / "train.parquet"))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rows": len(ds)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(glue_dir: Path, command: str, *, model: str = "minilm-l6", max_length: int = 128, repeats: int = 3,
        batch_rows: int | None = None) -> tuple[dict[str, Any], str]:
    from pipeline.config import DataConfig
    from pipeline.runtime import init_ray

    batch_rows = batch_rows or DataConfig().batch_rows
    init_ray()  # "Ray already running": its start-up is not part of either side
    ours(glue_dir, model, max_length, batch_rows)  # warm-up: worker processes, tokenizer files, imports
    theirs(glue_dir, model, max_length)
    a, b = [], []
    for i in range(repeats):
        print(f"repetition {i + 1}/{repeats}: ours ...", flush=True)
        a.append(ours(glue_dir, model, max_length, batch_rows))
        print(f"  {a[-1]['rows'] / a[-1]['seconds']:,.0f} rows/s; datasets.map ...", flush=True)
        b.append(theirs(glue_dir, model, max_length))
        print(f"  {b[-1]['rows'] / b[-1]['seconds']:,.0f} rows/s", flush=True)
    rows = a[0]["rows"]
    assert all(r["rows"] == rows for r in a + b), "both sides must process the same rows"
    ours_rps, theirs_rps = rows / median([r["seconds"] for r in a]), rows / median([r["seconds"] for r in b])
    result = {"benchmark": "preprocess", "command": command, "machine": machine(), "model": model,
              "max_length": max_length, "rows": rows, "repeats": repeats, "batch_rows": batch_rows,
              "ours": {"seconds": [r["seconds"] for r in a], "rows_per_s": ours_rps},
              "datasets_map": {"seconds": [r["seconds"] for r in b], "rows_per_s": theirs_rps, "num_proc": 2},
              "ratio": ours_rps / theirs_rps}
    md = header("preprocessing (SST-2 train, read → tokenize → Parquet)", command, result["machine"]) + [
        f"{rows:,} rows, tokenizer of `{model}`, max {max_length} tokens; median of {repeats} alternating repetitions "
        "after one warm-up of each side; Ray already running.", "",
        "| side | rows/s | seconds (each repetition) |", "|---|---:|---|",
        f"| ours: `prepare_tasks` (Ray Data read → normalise → tokenize → Parquet, batch {batch_rows}) | "
        f"{ours_rps:,.0f} | {', '.join(f'{s:.2f}' for s in result['ours']['seconds'])} |",
        f"| `datasets`: read TSV → `Dataset.map(batched=True, num_proc=2)` → Parquet | {theirs_rps:,.0f} | "
        f"{', '.join(f'{s:.2f}' for s in result['datasets_map']['seconds'])} |",
        "", f"Ratio ours / datasets: **{result['ratio']:.2f}×**", ""]
    return result, "\n".join(md)
