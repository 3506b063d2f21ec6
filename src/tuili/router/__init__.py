"""The router's model: request features (features.py), a small logistic regression (classifier.py),
labelled data (data.py) and the `tuili router` commands (commands.py). Pure Python and numpy:
nothing here imports torch, and only training imports numpy."""
from __future__ import annotations

from pathlib import Path

DEFAULT_ROUTER = Path(__file__).with_name("default_router.json")
