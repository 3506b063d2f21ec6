"""`--model NAME=MODEL[,key=value...]`: one served model and its own engine options.

Decisions:
- Keys are EngineConfig's dataclass fields (dashes may stand for underscores), so every
  engine option, including ones added later (e.g. `quantization`), can be set per model
  without touching this file. An unknown key is a ValueError naming the known ones.
- Values are typed from their text: `none`/`null` -> None, `true`/`false` -> bool, an
  integer or a float literal -> a number, anything else stays a string ("256MiB").
  EngineConfig validates the values themselves when the engine is built.
- Per-model options override the server-wide engine flags for that model only; so each
  model has its own KV budget (`kv_cache_memory`, default the server-wide one).
- The MODEL part may not contain a comma (commas separate the options).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineConfig

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


@dataclass
class ModelSpec:
    name: str | None  # None: named after the model (or --served-model-name)
    model: str  # HF folder, .gguf file or known name
    options: dict[str, Any] = field(default_factory=dict)


def engine_option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(EngineConfig)]


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_model_spec(text: str, known_options: list[str] | None = None) -> ModelSpec:
    """'fast=smollm2-135m-instruct,kv_cache_memory=256MiB' -> ModelSpec; ValueError on bad input."""
    known = known_options if known_options is not None else engine_option_names()
    head, *rest = text.split(",")
    if "=" not in head:
        raise ValueError(f"--model: expected NAME=MODEL[,key=value...], got {text!r}")
    name, model = (s.strip() for s in head.split("=", 1))
    if not _NAME_RE.match(name):
        raise ValueError(f"--model: invalid name {name!r} (letters, digits and ._:/- only)")
    if not model:
        raise ValueError(f"--model: no model given for {name!r}")
    options: dict[str, Any] = {}
    for item in rest:
        if "=" not in item:
            raise ValueError(f"--model {name}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in known:
            raise ValueError(f"--model {name}: unknown engine option {key!r}; known: {', '.join(known)}")
        options[key] = parse_value(value)
    return ModelSpec(name, model, options)


def parse_router_spec(text: str) -> tuple[str, str]:
    """'fast=NAME,strong=NAME' -> (fast, strong)."""
    parts: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--router: expected fast=NAME,strong=NAME, got {text!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in ("fast", "strong"):
            raise ValueError(f"--router: unknown key {key!r}; expected fast=NAME,strong=NAME")
        parts[key] = value
    if set(parts) != {"fast", "strong"}:
        raise ValueError(f"--router: both fast=NAME and strong=NAME are needed, got {text!r}")
    return parts["fast"], parts["strong"]
