"""Shared test set-up: a persistent model cache and the default model, converted once.

TUILI_CACHE defaults to `.venv/tuili-cache` in the repo (unless already set), so the
SmolLM2 conversion (~15 s) happens once per checkout, not once per run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUILI_CACHE", str(ROOT / ".venv" / "tuili-cache"))


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    """The HF-style folder of the default model (smollm2-135m-instruct), converted if needed."""
    from tuili.model.loader import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)
