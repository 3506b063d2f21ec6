"""Find a model, convert it once to a Hugging Face-style folder, and load its weights.

One format on disk for the engine: an HF-style folder (config.json, *.safetensors,
tokenizer files). A GGUF file (or a known name, `known_models.py`) is converted once
(`gguf_convert.py`) into such a folder under `cache_dir()/models/`, installed atomically
(`model_cache.py`); every later load is a plain safetensors read that needs neither
`gguf` nor `transformers`. This module is the door: `resolve_model_path` and `load_model`
take a name, a .gguf file or an HF folder; it also reads HF folders.

The names other modules and tests import from here (known-model tables, `convert_gguf`,
`unpermute_qk`) stay importable from this module.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import DEFAULT_MODEL, ModelConfig, cache_dir
from .gguf_convert import (config_dict, convert_tensors, generation_config, one_line, open_gguf, save_tokenizer,
                           unpermute_qk)
from .known_models import CHUNKED_MODELS, KNOWN_MODELS, PACKAGE_PINS, is_known, known_model_gguf, known_names
from .model_cache import (CONVERTER_VERSION, SOURCE_MARKER, gguf_cache_folder, install, read_marker,
                          remove_abandoned_temp_folders, sibling_temp_folder, source_stamp)

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "CHUNKED_MODELS", "PACKAGE_PINS", "CONVERTER_VERSION", "SOURCE_MARKER",
           "LoadedModel", "resolve_model_path", "load_model", "convert_gguf", "known_model_gguf", "unpermute_qk"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for the engine: its shape, its weights and where its tokenizer is."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF Llama-style names, on CPU, dtype as stored
    folder: Path  # HF-style folder: config.json + tokenizer files
    name: str  # display name


def resolve_model_path(model: str) -> Path:
    """Return the HF-style folder for a known name, a .gguf file or an HF folder.

    Known names and GGUF files are converted into the cache on first use.
    Raises FileNotFoundError or ValueError with a one-line message naming the path.
    """
    if is_known(model):
        return _ensure_converted(known_model_gguf(model), cache_dir() / "models" / model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: folder has no config.json, so it is not a "
                                    "Hugging Face model folder")
        return path
    if path.is_file():
        return _ensure_converted(path, gguf_cache_folder(path))
    raise FileNotFoundError(f"{model}: no such file or folder, and not a known model name "
                            f"(known: {', '.join(known_names())})")


def load_model(model: str) -> LoadedModel:
    """Resolve `model`, then read its config.json and all its safetensors shards."""
    folder = resolve_model_path(model)
    config = _model_config(folder / "config.json")
    weights = _read_safetensors(folder)
    name = model if is_known(model) else _display_name(Path(model))
    return LoadedModel(config=config, weights=weights, folder=folder, name=name)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into an HF-style folder at `out_dir`; return `out_dir`.

    Writes config.json, generation_config.json, model.safetensors (float32, HF names) and
    the tokenizer files into a temporary folder, then renames it into place. An existing
    `out_dir` is replaced, unless it is a conversion of the very same file (then kept).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    hf_config = config_dict(reader, gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_folders(out_dir)
    tmp = sibling_temp_folder(out_dir, "tmp")
    try:
        tensors = convert_tensors(reader, hf_config, gguf_path)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", generation_config(hf_config))
        save_tokenizer(reader, gguf_path, tmp)
        _write_json(tmp / SOURCE_MARKER, source_stamp(gguf_path))
        tmp.chmod(0o755)  # mkdtemp made it private
        install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _ensure_converted(gguf_path: Path, out_dir: Path) -> Path:
    marker = read_marker(out_dir)
    if marker == source_stamp(gguf_path):
        return out_dir
    if marker is not None:
        log.info("%s is stale, converting %s again", out_dir, gguf_path)
    return convert_gguf(gguf_path, out_dir)


def _display_name(path: Path) -> str:
    return path.stem if path.is_file() else path.resolve().name


# ------------------------------------------------------------------------ HF folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({one_line(e)})") from e


def _model_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf_config(_read_json(path))
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {one_line(e)}") from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (other weight formats "
                                "are not supported)")
    return shards


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in _shard_files(folder):
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: shard listed in the index is missing")
        try:
            part = load_file(str(shard), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"{shard}: cannot read safetensors ({one_line(e)})") from e
        duplicates = weights.keys() & part.keys()
        if duplicates:
            raise ValueError(f"{shard}: tensor {sorted(duplicates)[0]} is also in another shard")
        weights.update(part)
    return weights


