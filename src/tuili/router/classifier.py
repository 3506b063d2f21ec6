"""A standardised logistic regression: fitted with numpy, scored in pure Python, saved as JSON.

Decisions:
- Fitting is Newton's method (iteratively reweighted least squares) with an L2 penalty
  on the weights (not the bias): a couple of dozen features and a few hundred rows
  converge in a few iterations, with no learning rate to tune and a unique answer.
- Features are standardised with the training mean and standard deviation; a feature
  that never varies in training gets std 1 and weight 0, so an unseen value there
  cannot blow the score up.
- Scoring a request is a dot product over ~25 floats in plain Python: for one row that
  is faster than building a numpy array, and the server never imports numpy or torch
  on the request path because of the router.
- The threshold is calibrated, not 0.5: it is the (1 - strong_share) quantile of the
  scores on the calibration set. Those scores are out-of-fold (each training row scored
  by a fit that did not see it, `CALIBRATION_FOLDS` folds): in-sample scores are more
  extreme than the ones unseen requests get, and a threshold read off them missed the
  target share on held-out data (13.6% for a 20% target; 16.8% with out-of-fold scores), so the share of requests sent to the strong model is
  the operator's choice. The file stores 201 score quantiles, so a different share
  can be chosen at load time (`with_strong_share`) without the data.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .features import FEATURE_NAMES

FORMAT = "tuili-router/1"
NUM_QUANTILES = 201
CALIBRATION_FOLDS = 5


@dataclass
class RouterClassifier:
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    quantiles: list[float]  # scores at probabilities 0, 0.005, ..., 1 on the calibration set
    strong_share: float = 0.2
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    # ---- scoring -------------------------------------------------------------
    def score(self, x: Sequence[float]) -> float:
        """Probability that the request is hard."""
        z = self.bias
        for xi, m, s, w in zip(x, self.mean, self.std, self.weights):
            z += w * (xi - m) / s
        if z < -40:
            return 0.0
        return 1.0 / (1.0 + math.exp(-z))

    def is_hard(self, score: float) -> bool:
        return score >= self.threshold

    def contributions(self, x: Sequence[float]) -> list[tuple[str, float, float]]:
        """(feature, value, contribution to the logit), largest effect first: for `explain`."""
        rows = [(n, xi, w * (xi - m) / s) for n, xi, m, s, w in
                zip(self.feature_names, x, self.mean, self.std, self.weights)]
        return sorted(rows, key=lambda r: -abs(r[2]))

    # ---- calibration ---------------------------------------------------------
    def with_strong_share(self, share: float) -> "RouterClassifier":
        """Move the threshold so that `share` of the calibration scores lie at or above it."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"router strong share: must be in [0, 1], got {share}")
        self.strong_share = share
        self.threshold = threshold_for_share(self.quantiles, share)
        return self

    # ---- files ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "feature_names": self.feature_names, "mean": self.mean, "std": self.std,
                "weights": self.weights, "bias": self.bias, "strong_share": self.strong_share,
                "threshold": self.threshold, "score_quantiles": self.quantiles, "info": self.info}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(_rounded(self.to_json()), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RouterClassifier":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such router file") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a router file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a router file (format {FORMAT!r} expected)")
        names = list(data.get("feature_names") or [])
        if (data.get("info") or {}).get("signal") == "probe":  # one weight per hidden dimension (probe.py)
            if names != hidden_feature_names(len(names)) or len(data["weights"]) != len(names):
                raise ValueError(f"{path}: a probe router's features must be h0..h<n> with one weight each")
        elif names != list(FEATURE_NAMES):
            raise ValueError(f"{path}: trained on other features than this tuili computes; retrain it "
                             "with `tuili router train`")
        return cls(list(data["feature_names"]), data["mean"], data["std"], data["weights"], data["bias"],
                   data["score_quantiles"], data["strong_share"], data["threshold"], data.get("info", {}))


def hidden_feature_names(width: int) -> list[str]:
    """Feature names of a probe router: one per hidden dimension (router/probe.py)."""
    return [f"h{i}" for i in range(width)]


def threshold_for_share(quantiles: list[float], share: float) -> float:
    """The score at quantile (1 - share) of the calibration distribution, interpolated."""
    if share <= 0.0:
        return math.inf
    if share >= 1.0:
        return -math.inf
    pos = (1.0 - share) * (len(quantiles) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(quantiles) - 1)
    return quantiles[lo] + (quantiles[hi] - quantiles[lo]) * (pos - lo)


def share_above(scores: Sequence[float], threshold: float) -> float:
    ordered = sorted(scores)
    return 1.0 - bisect_left(ordered, threshold) / max(len(ordered), 1)


def fit(x: "Sequence[Sequence[float]]", y: Sequence[int], strong_share: float = 0.2, l2: float = 10.0,
        iterations: int = 50, info: dict | None = None, names: list[str] | None = None) -> RouterClassifier:
    """Fit on rows x (`names` order, FEATURE_NAMES by default) and labels y (1 = hard); calibrate on
    out-of-fold scores of those rows."""
    import numpy as np

    X = np.asarray(x, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != t.shape[0] or X.shape[0] < 2:
        raise ValueError("router train: need at least two labelled rows")
    if t.min() == t.max():
        raise ValueError("router train: the data must have both easy and hard examples")
    w, mean, std, constant = _fit_newton(X, t, l2, iterations)
    scores = _out_of_fold_scores(X, t, l2, iterations)
    weights = w[:-1].copy()
    weights[constant] = 0.0
    quantiles = np.quantile(scores, np.linspace(0.0, 1.0, NUM_QUANTILES)).tolist()
    names = list(names or FEATURE_NAMES)
    if len(names) != X.shape[1]:
        raise ValueError(f"router train: {X.shape[1]} values per row for {len(names)} feature names")
    clf = RouterClassifier(names, mean.tolist(), std.tolist(), weights.tolist(), float(w[-1]),
                           quantiles, info=dict(info or {}, rows=int(X.shape[0]), hard=int(t.sum()), l2=l2,
                                                oof_auc=auc(scores.tolist(), [int(v) for v in t])))
    return clf.with_strong_share(strong_share)


def _fit_newton(X, t, l2: float, iterations: int):
    import numpy as np

    mean = X.mean(axis=0)
    std = X.std(axis=0)
    constant = std < 1e-9
    std[constant] = 1.0
    Z = np.hstack([(X - mean) / std, np.ones((X.shape[0], 1))])
    Z[:, :-1][:, constant] = 0.0
    w = np.zeros(Z.shape[1])
    penalty = np.full(Z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ w, -40, 40)))
        grad = Z.T @ (p - t) + penalty * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(penalty) + 1e-9 * np.eye(Z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    w[:-1][constant] = 0.0
    return w, mean, std, constant


def _out_of_fold_scores(X, t, l2: float, iterations: int):
    """Each row scored by a fit on the other folds (rows dealt round-robin, so no seed)."""
    import numpy as np

    n = X.shape[0]
    folds = min(CALIBRATION_FOLDS, n)
    scores = np.zeros(n)
    for f in range(folds):
        test = np.arange(f, n, folds)
        train = np.setdiff1d(np.arange(n), test)
        if len(train) < 2 or t[train].min() == t[train].max():  # too few rows to hold any out
            test, train = np.arange(n), np.arange(n)
        w, mean, std, _ = _fit_newton(X[train], t[train], l2, iterations)
        z = ((X[test] - mean) / std) @ w[:-1] + w[-1]
        scores[test] = 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))
    return scores


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the chance a random hard row outscores a random easy one (ties 1/2)."""
    pairs = sorted(zip(scores, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2
        rank_sum += avg_rank * sum(lab for _, lab in pairs[i:j])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.7g}") if math.isfinite(obj) else obj
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj
