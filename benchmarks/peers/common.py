"""Where the peers live and how a child process is run: shared by install, run and cold-start."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuili.config import DEFAULT_MODEL


def log(msg: str) -> None:
    """One line per event, with the time, on stderr (stdout carries the tables)."""
    print(f"{time.strftime('%H:%M:%S')} peers: {msg}", file=sys.stderr, flush=True)


def peers_dir(option: str | None) -> Path:
    """--peers-dir, else $TUILI_PEERS_DIR; there is no default (machines differ in where space is)."""
    chosen = option or os.environ.get("TUILI_PEERS_DIR")
    if not chosen:
        raise ValueError("where do the peers live? pass --peers-dir DIR or set TUILI_PEERS_DIR")
    return Path(chosen).resolve()


def model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The converted HF folder of the default model (converted into TUILI_CACHE on first use)."""
    from tuili.model.loader import resolve_model_path

    return Path(resolve_model_path(name))


@dataclass(frozen=True)
class Layout:
    """Every path of the peers directory in one place, so install and run agree."""
    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def llama(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def llama_server(self) -> Path:
        return self.llama / "build" / "bin" / "llama-server"

    @property
    def gguf(self) -> Path:
        return self.llama / "model-bf16.gguf"

    @property
    def vllm_python(self) -> Path:
        return self.root / "vllm-venv" / "bin" / "python"

    @property
    def ov_python(self) -> Path:
        return self.root / "ov-venv" / "bin" / "python"

    @property
    def ov_model(self) -> Path:
        return self.root / "openvino" / "model-ir"

    @property
    def install_record(self) -> Path:
        return self.root / "install.json"


def run_logged(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               nice: int = 0) -> None:
    """Run a command to completion with its output in `log_path`; a failure names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    log(f"$ {' '.join(map(str, cmd))}  (log: {log_path})")
    with log_path.open("a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(map(str, cmd))}; see {log_path}: "
                           + " | ".join(tail))


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def which_or_fail(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found on PATH (apt-get install {name})")
    return found
