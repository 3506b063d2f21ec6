"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from tqdm import tqdm

from ..config import EngineConfig
from ..sampling import SamplingParams
from .engine import Engine, RequestOutput

DEFAULT_MODEL = "smollm2-135m-instruct"

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
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: Messages | Seq[Messages],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt_ids(c) for c in convs], sampling_params, use_tqdm)

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return params
