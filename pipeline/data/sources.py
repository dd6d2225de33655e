"""Where a task's rows come from: pick the source, find and check its files, read them with Ray Data.

Line formats (GLUE-style TSV without quoting, JSONL) are read as lines and parsed in the normaliser,
so a malformed line becomes a counted `unparsable` row instead of failing the whole read. CSV (with
quoting) and Parquet use Ray Data's structured readers. Hub datasets go through `datasets`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.normalise import Normaliser, _norm
from pipeline.errors import PipelineError, Problem
from pipeline.tasks.spec import FilesSource, HubSource, TaskSpec

BYTES_PER_BLOCK = 2 << 20  # split reads into ~2 MiB blocks so every CPU gets work, even from one file


@dataclass
class ResolvedSource:
    """A task's chosen source, checked, with a fingerprint of its content for the cache key."""

    task: str
    source: FilesSource | HubSource
    files: dict[str, list[str]]  # split -> absolute paths (files sources)
    fingerprint: str
    description: str  # for logs and MLflow lineage
    normaliser: Normaliser

    @property
    def num_bytes(self) -> int:
        return sum(os.path.getsize(p) for paths in self.files.values() for p in paths)


def resolve_source(spec: TaskSpec, data: DataConfig) -> ResolvedSource:
    source = pick_source(spec, data)
    if isinstance(source, HubSource):
        return _resolve_hub(spec, source, data)
    return _resolve_files(spec, source, data)


def pick_source(spec: TaskSpec, data: DataConfig) -> FilesSource | HubSource:
    """The local source when it can be had (GLUE folder set, package installed), else the hub."""
    local = spec.local
    if local is not None:
        if local.root.startswith("glue_dir:"):
            if data.glue_dir is not None:
                return local
        elif local.root.startswith("package:"):
            if importlib.util.find_spec(local.root.removeprefix("package:").split("/")[0]) is not None:
                return local
        else:
            return local
    if spec.hub is not None:
        return spec.hub
    need = "set data.glue_dir to a GLUE folder" if local and local.root.startswith("glue_dir:") else \
        f"install the package {local.root.removeprefix('package:').split('/')[0]!r} (rerun the setup)" if local else "declare files"
    raise PipelineError.one(f"tasks.{spec.name}", "no usable source", need)


def _root(source: FilesSource, data: DataConfig) -> Path:
    if source.root.startswith("glue_dir:"):
        return Path(data.glue_dir) / source.root.removeprefix("glue_dir:")
    if source.root.startswith("package:"):
        package, _, sub = source.root.removeprefix("package:").partition("/")
        return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / sub
    return Path(source.root or ".")


def _resolve_files(spec: TaskSpec, source: FilesSource, data: DataConfig) -> ResolvedSource:
    root = _root(source, data)
    files: dict[str, list[str]] = {}
    problems: list[Problem] = []
    names_of_path: dict[str, tuple[str, ...]] = {}
    header_of_path: dict[str, str] = {}
    unlabelled = set()
    hashes: dict[str, str] = {}  # path -> sha256 of its bytes (read once, with the decode check)
    for split, entry in source.splits.items():
        if not entry.labelled:
            unlabelled.add(split)
        paths: list[str] = []
        for pattern in entry.paths:
            full = (root / pattern).expanduser()
            matches = sorted(glob.glob(str(full))) if any(c in pattern for c in "*?[") else [str(full)]
            for m in matches or [str(full)]:
                if not os.path.isfile(m):
                    problems.append(Problem(m, f"file not found (task {spec.name}, split {split})",
                                            _missing_fix(spec, source)))
                else:
                    paths.append(str(Path(m).resolve()))
        files[split] = paths
        for path in paths:
            text = source.format in ("tsv", "csv", "jsonl")
            hashes[path], decodes = _scan(path, source.encoding if text else None)
            if text:
                unusable = ((None if decodes else _decode_problem(spec, source, path))
                            or _empty_problem(spec, source, path, split, entry.column_names))
                if unusable is not None:
                    problems.append(unusable)
                    continue
            if source.format in ("tsv", "csv"):
                names, header = _header(path, source.format, entry.column_names, source.encoding)
                names_of_path[_norm(path)] = names
                if header is not None:
                    header_of_path[_norm(path)] = header
                problems += _check_columns(spec, source, path, names, split in unlabelled)
            elif source.format == "jsonl":
                problems += _check_columns(spec, source, path, _jsonl_keys(path, source.encoding), split in unlabelled)
            elif source.format == "parquet":
                import pyarrow.parquet as pq
                problems += _check_columns(spec, source, path, pq.read_schema(path).names, split in unlabelled)
    if problems:
        raise PipelineError(problems)
    digest = hashlib.sha256()
    for split in sorted(files):
        for path in files[split]:
            digest.update(f"{split}\0{os.path.relpath(path, root)}\0{hashes[path]}\0".encode())
    split_of_path = {_norm(p): s for s, ps in files.items() for p in ps}
    layout = {"tsv": "lines", "jsonl": "lines", "text_folders": "text_folders"}.get(source.format, "table")
    normaliser = Normaliser(spec, source.columns, layout, source.format, split_of_path, names_of_path, header_of_path,
                            frozenset(unlabelled), dict(source.where), source.carve_from, dict(source.carve),
                            data.carve_seed, labels_by_name=source.root == "" and bool(spec.label_names))
    n = sum(map(len, files.values()))
    folder = os.path.commonpath([os.path.dirname(p) for ps in files.values() for p in ps]) if n else str(root)
    return ResolvedSource(spec.name, source, files, digest.hexdigest()[:16],
                          f"{source.format} files under {folder} ({n} file{'s' * (n != 1)})", normaliser)


def _missing_fix(spec: TaskSpec, source: FilesSource) -> str:
    if source.root.startswith("glue_dir:"):
        return f"data.glue_dir must hold the standard GLUE layout ({source.root.removeprefix('glue_dir:')}{'/'}*.tsv)"
    if source.root.startswith("package:"):
        return "reinstall the package (rerun the setup)"
    return f"fix the path under tasks.{spec.name}.define.files (relative paths start at the working directory)"


def _scan(path: str, encoding: str | None) -> tuple[str, bool]:
    """One pass over a file's bytes: its sha256 (the cache key) and whether it decodes with `encoding`
    (None: a binary format, not checked)."""
    import codecs
    digest, decoder, decodes = hashlib.sha256(), codecs.getincrementaldecoder(encoding)() if encoding else None, True
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            if decoder is not None and decodes:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    decodes = False
    if decoder is not None and decodes:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            decodes = False
    return digest.hexdigest(), decodes


def _decode_problem(spec: TaskSpec, source: FilesSource, path: str) -> Problem:
    """A text file that does not decode with the task's encoding (see _scan): the line and byte offset of the
    first bad byte (Ray Data would otherwise fail mid-read with a bare UnicodeDecodeError)."""
    offset, number, start, bad = 0, 0, 0, b""  # the defaults: a multi-byte sequence cut at the end of the file
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode(source.encoding)
            except UnicodeDecodeError as err:
                start, bad = err.start, line[err.start:err.end]
                break
            offset += len(line)
    at = offset + start
    key = f"tasks.{spec.name}.define.encoding" if source.root == "" else None
    fix = (f"save the file as {source.encoding}, or set {key} to the file's encoding (e.g. latin-1, cp1252)" if key else
           f"the file is damaged or not the expected {spec.name} file: fetch it again")
    return Problem(f"{path}:{number}", f"not valid {source.encoding} text: byte {bad.hex() or 'end'} at offset {at:,}",
                   fix)


def _empty_problem(spec: TaskSpec, source: FilesSource, path: str, split: str,
                   declared: tuple[str, ...] | None) -> Problem | None:
    """A text file with no rows (empty, only a header, or JSONL whose first line is not an object) is
    named here, instead of surfacing later as 'no usable rows left'."""
    fix = (f"put rows in it, or remove it from tasks.{spec.name}.define.files" if source.root == "" else
           f"the file is damaged or not the expected {spec.name} file: fetch it again")
    with open(path, encoding=_python_encoding(source.encoding), newline="") as fh:
        first = fh.readline()
        if not first.strip():
            rest = first + fh.read(1 << 16)
            if not rest.strip():
                return Problem(path, f"file is empty (task {spec.name}, split {split})", fix)
        if source.format in ("tsv", "csv") and not declared:
            while chunk := fh.read(1 << 16):
                if chunk.strip():
                    return None
            return Problem(f"{path}:1", f"only a header line, no rows (task {spec.name}, split {split})", fix)
    if source.format == "jsonl":
        with open(path, encoding=_python_encoding(source.encoding)) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    return None  # a malformed line is counted as unparsable; the rest may be fine
                if not isinstance(record, dict):
                    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
                    return Problem(f"{path}:{number}", f"line is {kind}, but every JSONL line must be a JSON object", 'write one object per line, e.g. {"text": "...", "label": "..."}')
                return None
    return None


def _header(path: str, fmt: str, declared: tuple[str, ...] | None,
            encoding: str = "utf-8") -> tuple[tuple[str, ...], str | None]:
    """Column names of a TSV/CSV file and the header line to skip (None for header-less files)."""
    with open(path, encoding=_python_encoding(encoding), newline="") as fh:
        first = fh.readline().rstrip("\r\n")
    if declared:  # header-less file (CoLA train/dev): every line is data
        return tuple(declared), None
    if fmt == "tsv":
        return tuple(first.split("\t")), first
    import csv
    return tuple(next(csv.reader([first]))), first


def _python_encoding(encoding: str) -> str:
    """UTF-8 is read as utf-8-sig: a byte-order mark at the start of a file is not part of its first line."""
    import codecs
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _jsonl_keys(path: str, encoding: str = "utf-8") -> list[str]:
    with open(path, encoding=_python_encoding(encoding)) as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return []  # counted as unparsable later; the columns are checked on other lines
                return list(record) if isinstance(record, dict) else []
    return []


def _check_columns(spec: TaskSpec, source: FilesSource, path: str, names, unlabelled: bool) -> list[Problem]:
    if not names:
        return []
    cols = source.columns
    roles = {"text": cols.text, "text_pair": cols.text_pair, "where": None}
    if not unlabelled:
        roles.update(label=cols.label, target=cols.target)
    key = f"tasks.{spec.name}.define.columns" if source.root == "" else f"data.glue_dir ({spec.name})"
    problems = []
    for role, col in roles.items():
        if col and col not in names:
            problems.append(Problem(f"{path}:1", f"no {role} column {col!r}; the columns are {list(names)}",
                                    f"set {key}.{role} to one of them" if source.root == "" else
                                    f"this is not the expected file for {spec.name}; check {key}"))
    for col in source.where:
        if col not in names:
            problems.append(Problem(f"{path}:1", f"no column {col!r} to filter on; the columns are {list(names)}",
                                    f"fix tasks.{spec.name}.define.where"))
    return problems


def read_files(resolved: ResolvedSource, num_cpus: float = 1):
    """A Ray Dataset of the source's raw rows, split into enough blocks to use every CPU."""
    import ray.data
    import pyarrow.csv as pacsv

    source = resolved.source
    paths = [p for ps in resolved.files.values() for p in ps]
    blocks = max(4, resolved.num_bytes // BYTES_PER_BLOCK, len(paths))
    if source.format in ("tsv", "jsonl"):  # a UTF-8 byte-order mark is stripped by the normaliser
        return ray.data.read_text(paths, include_paths=True, override_num_blocks=blocks, num_cpus=num_cpus,
                                  encoding=source.encoding)
    if source.format == "text_folders":
        return ray.data.read_binary_files(paths, include_paths=True, num_cpus=num_cpus,
                                          override_num_blocks=min(len(paths), 64))
    if source.format == "parquet":
        return ray.data.read_parquet(paths, include_paths=True, num_cpus=num_cpus)
    declared = {s.column_names for s in source.splits.values() if s.column_names}
    read_options = pacsv.ReadOptions(column_names=list(declared.pop()) if declared else None, encoding=source.encoding)
    return ray.data.read_csv(paths, include_paths=True, override_num_blocks=blocks, num_cpus=num_cpus,
                             read_options=read_options,
                             convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


def _resolve_hub(spec: TaskSpec, source: HubSource, data: DataConfig) -> ResolvedSource:
    """Check the hub is reachable (a clear error in a second, not minutes of retries)."""
    from huggingface_hub import HfApi
    try:
        info = HfApi().dataset_info(source.dataset)
    except Exception as err:
        raise PipelineError.one(
            f"tasks.{spec.name}", f"cannot reach hub dataset {source.dataset!r} ({type(err).__name__})",
            "use a local source: set data.glue_dir for GLUE tasks, install the task's package, "
            "or declare the task from local files with `define:`") from None
    normaliser = Normaliser(spec, source.columns, "table", unlabelled=frozenset(source.unlabelled),
                            carve_from=source.carve_from, carve=dict(source.carve), carve_seed=data.carve_seed)
    fingerprint = hashlib.sha256(f"{source.dataset}\0{source.config}\0{info.sha}".encode()).hexdigest()[:16]
    return ResolvedSource(spec.name, source, {}, fingerprint, f"hub {source.dataset} ({source.config or 'default'}) "
                          f"at {info.sha}", normaliser)


def read_hub(resolved: ResolvedSource):
    import datasets
    import pyarrow as pa
    import ray.data

    source = resolved.source
    parts = []
    for ours, theirs in source.splits.items():
        table = datasets.load_dataset(source.dataset, source.config, split=theirs).data.table
        table = table.append_column("split", pa.array([ours] * table.num_rows, pa.string()))
        parts.append(ray.data.from_arrow(table))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
