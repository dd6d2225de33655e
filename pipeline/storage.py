"""Run storage: a local folder or any pyarrow filesystem URI (`s3://`, `gs://`, `abfs://`, `hdfs://`,
`file://`) — the same places Ray Train and Tune accept as `storage_path`.

A run's small files (`run.json`) are read and written here directly; folders a plain process needs on
local disk (a model to load or register) are copied down with `local_copy`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> str:
    """Absolute form: `~` expanded and made absolute for local folders (Ray workers and Tune trials run
    in other working directories); URIs unchanged but for a trailing slash."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def filesystem(location: str | os.PathLike):
    """(pyarrow filesystem, path within it)."""
    import pyarrow.fs as pafs
    text = str(location)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser())


def _type(location: str):
    fs, path = filesystem(location)
    return fs.get_file_info(path).type


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs
    return _type(str(location)) == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs
    return _type(str(location)) == pafs.FileType.Directory


def read_text(location: str | os.PathLike) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small file whole: a local file is replaced atomically (temp file + rename); object stores
    publish an object only once its upload completes."""
    if not is_uri(location):
        path = Path(location).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(text.encode())


def remove(location: str | os.PathLike) -> None:
    """Delete one file (no error when it is already gone)."""
    import pyarrow.fs as pafs
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def remove_dir(location: str | os.PathLike) -> None:
    """Delete a folder and everything in it (no error when it is already gone)."""
    import pyarrow.fs as pafs
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def make_dirs(location: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def subdirs(location: str | os.PathLike, prefix: str = "") -> list[tuple[str, float]]:
    """(name, modification time) of the folders directly below `location` whose name starts with
    `prefix`; [] when `location` does not exist."""
    import pyarrow.fs as pafs
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append((info.base_name, mtime))
    return out


def mtime(location: str | os.PathLike) -> float:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local path to the file or folder at `location`: itself when local, else a temporary copy that is
    removed on exit."""
    if not is_uri(location):
        yield Path(location).expanduser()
        return
    import pyarrow.fs as pafs
    fs, path = filesystem(location)
    tmp = Path(tempfile.mkdtemp(prefix="mtl-storage-"))
    try:
        dest = tmp / path.rstrip("/").rsplit("/", 1)[-1]
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            dest.mkdir()  # (copy_files creates subfolders, not the destination itself)
            pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            dest.write_bytes(fs.open_input_stream(path).read())
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(location: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the folder at `location` into the local folder `dest` (kept; the caller owns it)."""
    import pyarrow.fs as pafs
    fs, path = filesystem(location)
    Path(dest).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(dest)
