"""The probe signal: a linear read-out of the fast model's own hidden state.

The router scores the fast model's residual stream after `layer` layers at the prompt's last
token with a logistic regression (classifier.py, one weight per hidden dimension). In the
server the request itself starts on the fast model asking for that state
(`SamplingParams.hidden_layer`); it comes with the first token, so a request the probe keeps
on the fast model computes its prompt once (serve/router.py, serve/routes.py). Offline
(`tuili router train/eval/explain`) each row is one prefill and one token through `LLM`.

Decisions:
- The last token, not a mean over the prompt: it is always computed (a prefix hit leaves
  at least the last token to run), so the signal is the same whether the prompt was
  cached or not, and it already attends to the whole prompt. Layer 8 of SmolLM2-135M's 30
  scored held-out AUC 0.990 against 0.997 for a mean at layer 12 (docs/BENCHMARKS.md).
- A probe is tied to the model it was fitted on: the file records the model's name,
  hidden size and layer count, and serving refuses a probe fitted on another shape.
- Text data rows ("prompt") are read as one user message through the chat template, as
  chat requests reach the fast model; a /v1/completions prompt is probed as sent (raw),
  so its prefill is the one the fast model reuses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .classifier import RouterClassifier

SIGNAL = "probe"
DEFAULT_LAYER = 8
DEFAULT_PROBE = Path(__file__).with_name("default_probe.json")
DEFAULT_FEATURES = Path(__file__).with_name("default_router.json")


def is_probe(clf: RouterClassifier) -> bool:
    return clf.info.get("signal") == SIGNAL


def probe_params(layer: int):
    from ..sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, hidden_layer=layer)


def shape_of(config) -> dict[str, int]:
    """What a probe must match in the model it reads."""
    return {"hidden_size": int(config.hidden_size), "num_layers": int(config.num_layers),
            "vocab_size": int(config.vocab_size)}


def check_model(clf: RouterClassifier, config, model_name: str, what: str = "--router-model") -> None:
    """Raise ValueError when the probe `clf` was fitted on a model of another shape."""
    want = clf.info.get("model_shape") or {}
    have = shape_of(config)
    if want != have:
        raise ValueError(f"{what}: the probe was fitted on {clf.info.get('model', '?')} {want}; the fast model "
                         f"{model_name} is {have}; fit one with `tuili router train --signal probe --model ...`")
    if clf.info.get("layer", -1) > have["num_layers"]:
        raise ValueError(f"{what}: layer {clf.info.get('layer')} is deeper than the model's {have['num_layers']}")


def prompt_ids(tokenizer, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
    """A data row's tokens as the fast model gets them in a chat request."""
    from ..engine.tokenizer import chat_prompt_ids

    return chat_prompt_ids(tokenizer, messages or [{"role": "user", "content": prompt or ""}])


def hidden_states(llm, rows: Iterable[tuple[str | None, list | None]], layer: int,
                  progress: bool = False) -> list[list[float]]:
    """The probe's input for each (prompt, messages) row, through an `LLM` of the fast model."""
    tok = llm.get_tokenizer()
    ids = [prompt_ids(tok, p, m) for p, m in rows]
    outs = llm.generate(ids, probe_params(layer), use_tqdm=progress)
    return [o.hidden for o in outs]


def load_fast_llm(clf: RouterClassifier, model: str | None = None, dtype: str = "float32"):
    """An offline LLM of the model a probe was fitted on (or `model`), checked against it."""
    from ..engine.llm import LLM

    llm = LLM(model or clf.info.get("model") or "smollm2-135m-instruct", dtype=dtype)
    check_model(clf, llm.engine.model_config, llm.engine.model_name, "--model")
    return llm
