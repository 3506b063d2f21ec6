"""The registry of served models: a name -> one AsyncEngine (one engine, one KV budget each)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..engine import AsyncEngine


class ModelNotFoundError(LookupError):
    pass


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, name: str, engine: AsyncEngine) -> ServedModel:
        if name in self._models:
            raise ValueError(f"model: the name {name!r} is served twice")
        self._models[name] = ServedModel(name, engine)
        return self._models[name]

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"The model {name!r} does not exist; served: {', '.join(self._models)}") from None

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def start(self) -> None:
        for m in self._models.values():
            m.engine.start()

    def shutdown(self) -> None:
        for m in self._models.values():
            m.engine.shutdown()
