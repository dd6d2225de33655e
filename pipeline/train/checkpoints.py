"""Checkpoints a run can trust: written with a manifest, verified before anything loads them.

Writing: every rank saves its DeepSpeed files into its own folder, then a manifest of exactly what it
wrote (`manifest/rank<r>.json`: size and sha256 per file); rank 0 also writes `meta.json` (step, world
size, MLflow run id) before its manifest. Ray Train merges the ranks' folders into
`<run dir>/step_<N>/` and registers a checkpoint only after its upload completed, so a write killed
half-way is never offered for resume.

Resuming: rank 0 verifies the latest checkpoint — meta.json readable, every rank's manifest present,
every file there with the recorded size and hash, every pickle loadable with
`torch.load(weights_only=True)` allowing only DeepSpeed's three state classes — and, if it fails, falls
back to the newest older `step_*` that passes, with a warning naming what was wrong. Every rank then
loads the checkpoint rank 0 chose. The failed checkpoint stays until Ray Train's retention
(`train.keep_checkpoints`) retires it; steps redone after a restart checkpoint into `step_N.rK`, never
into an existing folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from pipeline.train.rundir import CHECKPOINT_META, MANIFEST_DIR, STEP_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] != MANIFEST_DIR)


def write_manifest(folder: str | os.PathLike, rank: int) -> None:
    """Record every file this rank wrote into `folder` (call it last, after the rank's writes)."""
    folder = Path(folder)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    (folder / MANIFEST_DIR).mkdir(exist_ok=True)
    tmp = folder / MANIFEST_DIR / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": entries}, indent=1))
    os.replace(tmp, folder / MANIFEST_DIR / f"rank{rank}.json")


def safe_torch_load(path: str | os.PathLike):
    """`torch.load(weights_only=True)` of a DeepSpeed checkpoint file: tensors, containers and plain
    values, plus DeepSpeed's loss-scaler, ZeRO-stage enum and fragment-address classes — nothing else
    gets unpickled."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def verify(folder: str | os.PathLike) -> str | None:
    """None when the checkpoint in `folder` is complete and intact, else what is wrong."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CHECKPOINT_META).read_text())
        world = int(meta["world"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json unreadable ({type(err).__name__})"
    for rank in range(world):
        try:
            manifest = json.loads((folder / MANIFEST_DIR / f"rank{rank}.json").read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            return f"manifest of rank {rank} missing or unreadable ({type(err).__name__})"
        for name, entry in manifest.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{name} has {path.stat().st_size:,} bytes, {entry['bytes']:,} were written"
            if _sha256(path) != entry["sha256"]:
                return f"{name} does not match its recorded sha256"
            if name.endswith(".pt"):
                try:
                    safe_torch_load(path)
                except Exception as err:  # a pickle outside the allowlist, or unreadable
                    return f"{name} does not load with weights_only=True ({type(err).__name__}: {str(err)[:120]})"
    return None


def step_of(path: str) -> int | None:
    match = STEP_DIR.match(os.path.basename(str(path).rstrip("/")))
    return int(match.group(1)) if match else None


def checkpoint_order(path: str | os.PathLike) -> tuple[int, int]:
    match = STEP_DIR.match(os.path.basename(str(path).rstrip("/")))
    return int(match.group(1)), int(match.group(2) or 0)


def dir_name(step: int, taken: set[str]) -> str:
    """The folder name for a checkpoint at `step`: `step_NNNNNNN`, or with `.rK` when a restart redoes a
    step whose folder exists already (Ray Train would otherwise delete the new checkpoint's folder when it
    retires the old one of the same name)."""
    name, k = f"step_{step:07d}", 0
    while (name if k == 0 else f"{name}.r{k}") in taken:
        k += 1
    return name if k == 0 else f"{name}.r{k}"


def checkpoint_dirs(latest) -> list[str]:
    """Every `step_*` folder beside the checkpoint `latest` (a ray.train.Checkpoint), newest first."""
    import pyarrow.fs as pafs
    parent = os.path.dirname(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory and step_of(i.path) is not None),
                  key=checkpoint_order, reverse=True)


def candidates(latest):
    """The latest checkpoint, then the older `step_*` folders beside it, newest first."""
    from ray.train import Checkpoint
    if step_of(latest.path) is None:
        return [latest]
    older = [p for p in checkpoint_dirs(latest) if checkpoint_order(p) < checkpoint_order(latest.path)]
    return [latest] + [Checkpoint(path, filesystem=latest.filesystem) for path in older]


def choose(latest, rank: int, warn: Callable[[str], None]):
    """(the checkpoint to resume from, the names of the run's checkpoint folders). Rank 0 verifies the
    candidates and every rank gets its choice (a collective: every rank calls it). No checkpoint passes:
    (None, names)."""
    import torch.distributed as dist

    choice: list = [None, []]
    if rank == 0:
        choice[1] = [os.path.basename(p.rstrip("/")) for p in checkpoint_dirs(latest)]
        for checkpoint in candidates(latest):
            with checkpoint.as_directory() as folder:
                problem = verify(folder)
            if problem is None:
                choice[0] = checkpoint.path
                break
            warn(f"checkpoint {checkpoint.path} is unusable: {problem}; trying the previous one")
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None, set(choice[1])
    from ray.train import Checkpoint
    chosen = latest if choice[0] == latest.path else Checkpoint(choice[0], filesystem=latest.filesystem)
    return chosen, set(choice[1])
