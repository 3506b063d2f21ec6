"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from tqdm import tqdm

from ..config import DEFAULT_MODEL, EngineConfig
from ..sampling import SamplingParams
from .engine import Engine
from .outputs import RequestOutput
from .tokenizer import chat_prompt_ids

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", **engine_options: Any):
        self.engine = Engine(model, EngineConfig(dtype=dtype, **engine_options))
        self._ids = itertools.count()

    def close(self) -> None:
        """Save the KV cache to the disk tier (if configured) and wait for its writes."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run all prompts to completion, batched together; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        requests = [(f"offline-{next(self._ids)}", prompt, p) for prompt, p in zip(prompts, params)]
        bar = tqdm(total=len(requests), desc="generating", disable=not use_tqdm)
        outs = self.engine.generate(requests, on_finish=lambda _: bar.update(1))
        bar.close()
        return outs

    def chat(self, messages: Messages | Seq[Messages],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt_ids(c) for c in convs], sampling_params, use_tqdm)

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        return chat_prompt_ids(self.engine.tokenizer, messages)


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return params
