"""Writing a reloadable model folder out of a (possibly ZeRO-3 sharded) engine, onto run storage."""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any



def publish_model(engine, model, tokenizer, run_dir: str, name: str, rank: int, metadata: dict[str, Any],
                  files: dict[str, Any] | None = None) -> None:
    """Gather full weights (a no-op below ZeRO-3), rank 0 writes `<run_dir>/<name>/` atomically, with
    `files` (name -> JSON-able value) beside the model. Every rank must call this: gathering ZeRO-3
    parameters is collective."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        local = tempfile.mkdtemp(prefix="mtl-model-")
        try:
            model.save(local, tokenizer, state_dict=state, metadata=metadata)
            for fname, value in (files or {}).items():
                with open(f"{local}/{fname}", "w") as fh:
                    json.dump(value, fh)
            replace_folder(local, f"{run_dir}/{name}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
    dist.barrier()


def replace_folder(local: str, dest: str) -> None:
    """Copy a local folder to a local path or object-store URI, replacing what was there; the old
    copy is only removed once the new one is complete."""
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem
    fs, path = filesystem(dest)
    tmp, old = f"{path}.tmp", f"{path}.old"
    for p in (tmp, old):
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)
    fs.create_dir(tmp, recursive=True)  # copy_files creates subfolders, not the destination itself
    pafs.copy_files(local, tmp, destination_filesystem=fs)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.move(path, old)
    fs.move(tmp, path)
    if fs.get_file_info(old).type != pafs.FileType.NotFound:
        fs.delete_dir(old)


