"""The router's model: request features (features.py), a small logistic regression (classifier.py),
labelled data (data.py) and the `tuili router` commands (commands.py). Pure Python and numpy:
nothing here imports torch, and only training imports numpy."""
from __future__ import annotations

from pathlib import Path

from .classifier import RouterClassifier

DEFAULT_ROUTER = Path(__file__).with_name("default_router.json")


def load_router(path: str | Path | None = None, strong_share: float | None = None) -> RouterClassifier:
    """A router file (default: the one shipped), recalibrated for `strong_share` if given."""
    clf = RouterClassifier.load(path or DEFAULT_ROUTER)
    return clf.with_strong_share(strong_share) if strong_share is not None else clf
