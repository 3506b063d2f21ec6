"""Shared test set-up: a persistent model cache, the default model converted once, and tiny
random-weight models built once per session for every test that needs one.

TUILI_CACHE defaults to `.venv/tuili-cache` in the repo (unless already set), so the
SmolLM2 conversion (~15 s) happens once per checkout, not once per run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUILI_CACHE", str(ROOT / ".venv" / "tuili-cache"))


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    """The HF-style folder of the default model (smollm2-135m-instruct), converted if needed."""
    from tuili.model.loader import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)


# Small enough to build in well under a second, big enough for GQA, several blocks and layers.
TINY_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# The named variants greedy parity runs on (test_engine_random.py): what each one exercises,
# as (architecture, config overrides, random norm weights).
TINY_VARIANTS = {
    "llama-gqa-untied": ("llama", {}, False),
    "llama3-rope-scaling": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), False),
    "mistral": ("mistral", dict(sliding_window=None), False),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True), False),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=48), False),
    # Window 8: it cuts into every longer prompt. The query scale differs from head_dim**-0.5,
    # local and global layers use different rope bases (global with linear scaling), final
    # logits are softcapped, and norm weights are random (transformers sets them to 0).
    "gemma3-window": ("gemma3", dict(
        num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1, eos_token_id=2), True),
}


def _hf_classes(arch: str) -> tuple[type, type]:
    import transformers as t

    return {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
            "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM), "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
            "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM)}[arch]


class TinyModels:
    """Builds tiny random-weight transformers models, saved with `save_pretrained` so tuili
    loads them through its own HF-folder path; each set of arguments is built once per session.

    Weights of matrices are scaled up (random init is small, which would make greedy argmaxes
    near ties everywhere); `random_norms` also randomises norm weights (transformers sets
    Gemma's to 0, which would hide a wrong `1 + weight`).
    """

    def __init__(self, root: Path):
        self.root = root
        self._folders: dict[str, Path] = {}
        self._models: dict[Path, Any] = {}

    def __call__(self, arch: str = "llama", *, seed: int = 1234, scale: float = 4.0, random_norms: bool = False,
                 **overrides: Any) -> Path:
        """The folder of a tiny `arch` model: TINY_COMMON with `overrides` applied to its config."""
        key = json.dumps([arch, seed, scale, random_norms, overrides], sort_keys=True)
        if key not in self._folders:
            self._folders[key] = self._build(arch, seed, scale, random_norms, overrides)
        return self._folders[key]

    def variant(self, name: str) -> Path:
        """The folder of one of TINY_VARIANTS."""
        arch, overrides, random_norms = TINY_VARIANTS[name]
        return self(arch, random_norms=random_norms, **overrides)

    def _build(self, arch: str, seed: int, scale: float, random_norms: bool, overrides: dict) -> Path:
        import torch

        config_cls, model_cls = _hf_classes(arch)
        torch.manual_seed(seed)
        model = model_cls(config_cls(**{**TINY_COMMON, **overrides})).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if random_norms and "norm" in name:
                    p.copy_(torch.randn_like(p) * 0.5)
                elif p.dim() == 2:
                    p.mul_(scale)
        folder = self.root / f"{arch}-{len(self._folders)}"
        model.save_pretrained(folder)
        self._models[folder] = model
        return folder

    def hf(self, folder: str | Path):
        """The transformers model saved in `folder` (float32, eval mode)."""
        return self._models[Path(folder)]

    def config(self, folder: str | Path) -> dict[str, Any]:
        return json.loads((Path(folder) / "config.json").read_text())

    def prompts(self, folder: str | Path, lengths: list[int], seed: int = 7) -> list[list[int]]:
        """Random prompts of the given lengths over the model's vocabulary (ids 0-2 left out)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        vocab = self.config(folder)["vocab_size"]
        return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]

    def greedy(self, folder: str | Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """transformers' greedy continuation of each prompt alone, exactly `new_tokens` long."""
        import torch

        model = self.hf(folder)
        with torch.no_grad():
            return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """`tiny_model(arch, **config_overrides)` -> folder of a tiny random model, built once per
    session; `tiny_model.hf(folder)`, `.prompts(...)` and `.greedy(...)` for references."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny_variant(request: pytest.FixtureRequest, tiny_model: TinyModels) -> Path:
    """The folder of each of TINY_VARIANTS in turn: a test using it runs once per variant."""
    return tiny_model.variant(request.param)
