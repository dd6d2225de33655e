"""Preprocess tasks with Ray Data into a Parquet cache keyed by content.

    prepared = prepare_tasks(cfg)              # {task: PreparedTask}; reads the cache when it can
    train_ds = prepared["sst2"].dataset("train")

Per task: read the source -> normalise (one schema, a drop reason per bad row) -> tokenize -> write
Parquet partitioned by split into a temporary folder, then rename it into place, so a cache folder
either is complete or does not exist. The key hashes the source content, the task's preprocessing
fields, the tokenizer's files and the lengths; a second run with the same key reads the cache.
Dropped rows stay in the cache with their `drop_reason` and are counted in `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import Config
from pipeline.data.normalise import BAD_LABEL_REASONS
from pipeline.data.sources import ResolvedSource, read_files, read_hub, resolve_source
from pipeline.data.tokenize import Tokenizer
from pipeline.errors import PipelineError, Problem
from pipeline.model.refs import tokenizer_fingerprint
from pipeline.tasks.spec import SPLITS, HubSource, TaskSpec

SMALL_SPLIT_BYTES = 64 * 2**20  # PreparedTask.materialized: below this, ordered in the calling process
MAX_PASSES = 64  # PreparedTask.materialized: most copies of a small split in one dataset
CACHE_VERSION = 3  # bump when the cached schema or the normalisation rules change
MANIFEST = "manifest.json"


def rank_part(table, rank: int, workers: int):
    """Worker `rank`'s contiguous 1/`workers` part of an Arrow table: the rows an equal streaming split gives
    that rank (the remainder rows dropped)."""
    part = table.num_rows // workers
    return table.slice(rank * part, part)


@dataclass
class PreparedTask:
    name: str
    spec: TaskSpec
    path: Path
    manifest: dict
    cache_hit: bool

    @property
    def splits(self) -> list[str]:
        return [s for s, c in self.manifest["counts"].items() if c["kept"] > 0]

    def rows(self, split: str) -> int:
        return self.manifest["counts"].get(split, {}).get("kept", 0)

    def columns(self, split: str) -> list[str]:
        """The cached columns of a split, read from the Parquet schema (no Ray Data execution)."""
        import pyarrow.dataset as pads
        return [c for c in pads.dataset(str(self.path / f"split={split}"), format="parquet").schema.names]

    def table(self, split: str, limit: int | None = None, columns: list[str] | None = None,
              shuffle_seed: int | None = None):
        """Like `dataset()` — the same rows in the same order — as one in-memory Arrow table, for the
        small splits a driver collects whole (dev sets): a Ray Data sort costs seconds of scheduling."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        self._check_split(split)
        read = None if columns is None else sorted(set(columns) | {"drop_reason", "id"})
        table = pads.dataset(str(self.path / f"split={split}"), format="parquet").to_table(
            columns=read, filter=pads.field("drop_reason") == "", use_threads=False)  # see _count
        if shuffle_seed is not None:
            table = _with_order_key(table, shuffle_seed)
            table = table.take(pc.sort_indices(table, [("_order", "ascending")])).drop_columns(["_order"])
        if limit:
            table = table.slice(0, limit)
        return table if columns is None else table.select(columns)

    def materialized(self, split: str, limit: int | None = None, columns: list[str] | None = None,
                     shuffle_seed: int | None = None, *, workers: int = 1, pass_bytes: int = 0):
        """`dataset()` executed into the object store, e.g. for Ray Train's dataset shards. A split of at
        most SMALL_SPLIT_BYTES of Parquet is read and ordered here (`table()`) and handed over with
        `from_arrow` — a distributed sort costs ~5 s of task scheduling per dataset on 2 cores whatever
        its size; a larger split is sorted by Ray Data. Either way the same rows in the same order.

        `pass_bytes`: a small split is repeated inside the dataset up to about this many bytes (at most
        MAX_PASSES copies), laid out so that `streaming_split(workers, equal=True)` still gives worker i
        the rows it gets from the plain split (its contiguous 1/workers part), now several times over.
        One Ray Data execution then covers several epochs: each execution leaves ~0.6 MiB in Ray Data's
        cluster-wide `_StatsActor` for the life of the cluster (ray-project/ray#43924), and a training
        shard runs one execution per pass over its data."""
        import pyarrow as pa
        import ray.data

        if self.nbytes(split) > SMALL_SPLIT_BYTES:
            return self.dataset(split, limit, columns, shuffle_seed).materialize()
        table = self.table(split, limit, columns, shuffle_seed)
        copies = min(MAX_PASSES, pass_bytes // max(table.nbytes, 1)) if pass_bytes else 1
        if copies > 1:
            part = table.num_rows // workers  # an equal split drops the remainder rows in any case
            table = pa.concat_tables([table.slice(i * part, part) for i in range(workers) for _ in range(copies)])
        return ray.data.from_arrow(table)

    def worker_parts(self, split: str, limit: int | None = None, columns: list[str] | None = None,
                     shuffle_seed: int | None = None, *, workers: int = 1):
        """A small split (at most SMALL_SPLIT_BYTES of Parquet) as `workers` in-memory Arrow tables: worker i's
        contiguous 1/workers part of `table()`, the rows `streaming_split(workers, equal=True)` of
        `materialized()` gives it (the remainder rows dropped, as an equal split does). None for a larger
        split: that one streams through Ray Data."""
        if self.nbytes(split) > SMALL_SPLIT_BYTES:
            return None
        table = self.table(split, limit, columns, shuffle_seed)
        return [rank_part(table, i, workers) for i in range(workers)]

    def nbytes(self, split: str) -> int:
        """Size of a split's Parquet files in the cache."""
        return sum(f.stat().st_size for f in (self.path / f"split={split}").rglob("*.parquet"))

    def _check_split(self, split: str) -> None:
        if self.rows(split) == 0:
            raise PipelineError.one(f"tasks.{self.name}", f"has no {split} rows",
                                    f"use one of its splits: {', '.join(self.splits)}")

    def dataset(self, split: str, limit: int | None = None, columns: list[str] | None = None,
                shuffle_seed: int | None = None):
        """The kept rows of one split as a Ray Dataset (read lazily from the cache). Rows are cached in
        source order (often sorted by label): `shuffle_seed` orders them by a seeded hash of their id
        instead, which makes `limit` a random subset rather than the first rows of the file — and the
        same subset in the same order on every run (a seeded `random_shuffle` is not reproducible)."""
        import ray.data
        from ray.data.expressions import col

        self._check_split(split)
        read = None if columns is None else sorted(set(columns) | {"drop_reason", "id"})  # the filter and order need them
        ds = ray.data.read_parquet(str(self.path / f"split={split}"), columns=read)
        ds = ds.filter(expr=col("drop_reason") == "")
        if shuffle_seed is not None:
            ds = ds.map_batches(_with_order_key, fn_args=(shuffle_seed,), batch_format="pyarrow")
            # The keys are uniform on uint64, so fixed boundaries split them evenly: no sampling pass and
            # no 200-way shuffle for a few thousand rows (that costs ~6 s per dataset on 2 cores).
            ds = ds.sort("_order", boundaries=_ORDER_BOUNDARIES).drop_columns(["_order"])
        if limit:
            ds = ds.limit(limit)
        return ds if columns is None else ds.select_columns(columns)


_ORDER_BOUNDARIES = [k * 2**62 for k in (1, 2, 3)]


def _with_order_key(batch, seed: int):
    import pyarrow as pa
    from pipeline.data.normalise import seeded_hash
    keys = [seeded_hash(f"order-{seed}", i) for i in batch["id"].to_pylist()]
    return batch.append_column("_order", pa.array(keys, pa.uint64()))


def cache_key(spec: TaskSpec, resolved: ResolvedSource, tokenizer_fp: str, max_length: int,
              max_target: int | None, carve_seed: int) -> str:
    fields = {
        "version": CACHE_VERSION, "kind": spec.kind, "num_labels": spec.num_labels, "label_names": spec.label_names,
        "label_range": spec.label_range, "source": dataclasses.asdict(resolved.source),
        "source_content": resolved.fingerprint, "tokenizer": tokenizer_fp, "max_length": max_length,
        "max_target": max_target, "carve_seed": carve_seed if resolved.source.carve else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_tasks(cfg: Config, log: Callable[[str], None] = print, bar: bool = False) -> dict[str, PreparedTask]:
    """Preprocess (or load from cache) every configured task. Problems across tasks are reported together.
    `bar`: a tqdm bar over the tasks on stderr (for a terminal); the per-task lines print above it."""
    specs = cfg.task_specs()
    tokenizer_fp = tokenizer_fingerprint(cfg.model.name)
    resolved, problems = {}, []
    for name, spec in specs.items():  # check every source before spending time on any
        try:
            resolved[name] = resolve_source(spec, cfg.data)
        except PipelineError as err:
            problems += err.problems
    if problems:
        raise PipelineError(problems)
    if not bar:
        return {name: _prepare(cfg, specs[name], resolved[name], tokenizer_fp, log) for name in specs}
    from ray.data import DataContext
    from tqdm import tqdm

    DataContext.get_current().enable_progress_bars = False  # one bar: ours (Ray Data's per-operator bars off)

    def above(line: str) -> None:  # a line above the bar, not through it
        with tqdm.external_write_mode():
            log(line)

    prepared = {}
    with tqdm(total=len(specs), unit="task", desc="preprocess", file=sys.stderr, dynamic_ncols=True) as progress:
        for name in specs:
            progress.set_postfix_str(name)
            prepared[name] = _prepare(cfg, specs[name], resolved[name], tokenizer_fp, above)
            progress.update()
    return prepared


def _prepare(cfg: Config, spec: TaskSpec, resolved: ResolvedSource, tokenizer_fp: str,
             log: Callable[[str], None]) -> PreparedTask:
    max_target = None
    if spec.kind == "summarization":
        max_target = min(cfg.model.max_target_length, spec.max_target_tokens or cfg.model.max_target_length)
    key = cache_key(spec, resolved, tokenizer_fp, cfg.model.max_length, max_target, cfg.data.carve_seed)
    if cfg.data.cache_path is not None:
        folder = Path(cfg.data.cache_path) / spec.name
        _check_pinned(folder, spec.name, tokenizer_fp, cfg.model.name)
    else:
        folder = Path(cfg.data.cache_dir) / spec.name / key
    manifest = _read_manifest(folder)
    if manifest and manifest.get("key") == key:
        log(f"{spec.name}: cache hit {folder} (key {key}): "
            + ", ".join(f"{s} {c['kept']:,}" for s, c in manifest["counts"].items()))
        return PreparedTask(spec.name, spec, folder, manifest, cache_hit=True)
    if manifest:
        log(f"{spec.name}: pinned cache {folder} is for another key; rebuilding it in place")

    log(f"{spec.name}: preprocessing {resolved.description} with the {cfg.model.name} tokenizer "
        f"(max {cfg.model.max_length} tokens) -> {folder}")
    start = time.monotonic()
    ds = read_hub(resolved) if isinstance(resolved.source, HubSource) else read_files(resolved)
    pair = bool(resolved.source.columns.text_pair)
    ds = ds.map_batches(resolved.normaliser, batch_format="pyarrow", batch_size=cfg.data.batch_rows,
                        zero_copy_batch=True)
    ds = ds.map_batches(Tokenizer(cfg.model.name, cfg.model.max_length, max_target, pair),
                        batch_format="pyarrow", batch_size=cfg.data.batch_rows, zero_copy_batch=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ds.write_parquet(str(tmp), partition_cols=["split"])
        counts, examples = _count(tmp)
        _check_labels(spec, counts, examples, resolved, cfg.data.max_bad_labels)  # the more specific message first
        _check_not_empty(spec, counts)
        seconds = time.monotonic() - start
        manifest = {
            "key": key, "task": spec.name, "kind": spec.kind, "source": resolved.description,
            "source_fingerprint": resolved.fingerprint,
            "files": {s: ps for s, ps in resolved.files.items()},
            "tokenizer": {"model": cfg.model.name, "fingerprint": tokenizer_fp},
            "max_length": cfg.model.max_length, "max_target_length": max_target, "carve_seed": cfg.data.carve_seed,
            "counts": counts, "dropped_examples": examples, "seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows_in = sum(c["rows"] for c in counts.values())
    dropped = {r: n for c in counts.values() for r, n in c["dropped"].items()}
    log(f"{spec.name}: {rows_in:,} rows in {seconds:.1f}s ({rows_in / max(seconds, 1e-9):,.0f} rows/s); kept "
        + ", ".join(f"{s} {c['kept']:,}" for s, c in counts.items())
        + (f"; dropped {sum(dropped.values()):,} ({_fmt_reasons(dropped)})" if dropped else "; dropped 0"))
    return PreparedTask(spec.name, spec, folder, manifest, cache_hit=False)


def _fmt_reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{r} {n:,}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]))


def _count(folder: Path) -> tuple[dict, list]:
    """Rows, kept rows and drop reasons per split, read from the written Parquet (two small columns)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    data = pads.dataset(str(folder), format="parquet", partitioning="hive")
    table = data.to_table(columns=["split", "drop_reason"])
    # Single-threaded: Ray Data's Parquet reader resizes Arrow's process-wide CPU pool (to 32) when a read
    # is planned in this process, after which threaded Acero plans can fail with "thread index N is out
    # of range". The counts are tiny.
    grouped = table.group_by(["split", "drop_reason"], use_threads=False).aggregate([([], "count_all")]).to_pylist()
    counts: dict[str, dict] = {}
    for split in SPLITS:  # a stable order for logs and manifests
        rows = [g for g in grouped if g["split"] == split]
        if rows:
            dropped = {g["drop_reason"]: g["count_all"] for g in rows if g["drop_reason"]}
            total = sum(g["count_all"] for g in rows)
            counts[split] = {"rows": total, "kept": total - sum(dropped.values()), "dropped": dropped}
    bad = data.to_table(columns=["split", "id", "drop_reason", "text"], filter=pc.field("drop_reason") != "")
    examples = [{**r, "text": (r["text"] or "")[:120]} for r in bad.slice(0, 20).to_pylist()]
    return counts, examples


def _check_not_empty(spec: TaskSpec, counts: dict) -> None:
    empty = [s for s, c in counts.items() if c["rows"] and not c["kept"]]
    if "train" not in counts or counts["train"]["kept"] == 0:
        empty = sorted(set(empty) | {"train"})
    if empty:
        reasons = _fmt_reasons({r: n for c in counts.values() for r, n in c["dropped"].items()}) or "no rows at all"
        raise PipelineError.one(f"tasks.{spec.name}", f"no usable rows left in {', '.join(empty)} (dropped: {reasons})",
                                "check the column mapping, label names and the files themselves")


def _check_labels(spec: TaskSpec, counts: dict, examples: list, resolved: ResolvedSource, limit: float) -> None:
    """Too many unusable labels means a wrong label mapping, not a few bad rows: an error per split."""
    problems = []
    for split, c in counts.items():
        bad = sum(c["dropped"].get(r, 0) for r in BAD_LABEL_REASONS)
        if bad and bad > limit * c["rows"]:
            rows = [e for e in examples if e["split"] == split and e["drop_reason"] in BAD_LABEL_REASONS]
            where = ", ".join(map(str, resolved.files.get(split, []))) or resolved.description
            expected = (f"names {spec.label_names}" if spec.label_names else f"0..{spec.num_labels - 1}"
                        if spec.kind == "classification" else f"within {spec.label_range}")
            numbers = c["dropped"].get("label_not_a_name", 0)
            what = (f"{numbers:,} of {c['rows']:,} rows have numbers as labels, but label_names lists names "
                    f"{spec.label_names}" if numbers * 2 >= bad else
                    f"{bad:,} of {c['rows']:,} rows have labels that are not {expected}")
            fix = ("write the names in the label column, or drop label_names and set num_labels (labels 0..N-1)"
                   if numbers * 2 >= bad else "fix the label column or the task's label_names/num_labels/label_range")
            problems.append(Problem(
                f"{where} (task {spec.name}, split {split})",
                what + " (e.g. rows " + ", ".join(f"{e['id']} (text {e['text'][:40]!r})" for e in rows[:3]) + ")",
                f"{fix}; up to data.max_bad_labels={limit:g} of a split such rows are dropped and counted instead"))
    if problems:
        raise PipelineError(problems)


def _check_pinned(folder: Path, task: str, tokenizer_fp: str, model: str) -> None:
    manifest = _read_manifest(folder)
    if manifest and manifest["tokenizer"]["fingerprint"] != tokenizer_fp:
        raise PipelineError([Problem(
            "data.cache_path", f"{folder} was built with the {manifest['tokenizer']['model']} tokenizer "
            f"({manifest['tokenizer']['fingerprint']}), but model.name {model!r} has tokenizer {tokenizer_fp}",
            "unset data.cache_path (keyed folders never clash), point it at another folder, or delete that folder")])


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Atomic for a new folder; for a pinned folder the old copy is moved aside first, then removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
