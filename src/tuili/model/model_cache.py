"""The converted-model cache: which folder a GGUF file converts into, whether that folder
is still current, and installing a new one atomically.

A conversion writes into a hidden temporary folder beside the target and renames it into
place, so an interrupted conversion never leaves a half folder. A marker file
(`tuili-source.json`) records the source file (path, size, mtime) and the converter
version; a folder whose marker no longer matches is converted again. Temporary folders of
conversions whose process is gone are removed by the next conversion of the same target.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import cache_dir

CONVERTER_VERSION = 1
SOURCE_MARKER = "tuili-source.json"


def gguf_cache_folder(gguf_path: Path) -> Path:
    """`<stem>-<hash of absolute path, size, mtime>` under cache_dir()/models."""
    stamp = source_stamp(gguf_path)
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{digest}"


def source_stamp(gguf_path: Path) -> dict[str, Any]:
    st = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "converter": CONVERTER_VERSION}


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def install(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, moving an existing `out_dir` aside first.

    If a concurrent conversion of the same file got there first, its folder is kept (it
    may be in use) and `tmp` is dropped.
    """
    if read_marker(out_dir) == read_marker(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out_dir.exists():
        old = sibling_temp_folder(out_dir, "old")
        os.replace(out_dir, old)  # replaces the empty folder just made
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sibling_temp_folder(out_dir: Path, kind: str) -> Path:
    """A new hidden folder beside `out_dir`, named after it, `kind` and this process."""
    prefix = f".{out_dir.name}.{kind}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))


def remove_abandoned_temp_folders(out_dir: Path) -> None:
    """Delete temp folders left beside `out_dir` by conversions whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)-")
    for folder in out_dir.parent.glob(f".{out_dir.name}.*"):
        match = pattern.match(folder.name)
        if match and not _process_alive(int(match.group(2))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

