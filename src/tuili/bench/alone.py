"""One request run alone on an in-process `Engine`, stepped until it finishes.

`tuili generate`, `tuili chat`, `tuili bench decode` and `tuili bench multiturn` all add
one request and step the engine until it is done; they differ only in what they keep
(the text as it comes, the time of the first token, the token ids). The engine hands out
deltas (engine/outputs.py), so this sums them and notes when each step's tokens arrived.
Times are `time.perf_counter()` in this process: TTFT includes `add_request` (tokenizing a
text prompt) and the scheduler's first step, as a user of the engine sees it.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

_ids = itertools.count()


@dataclass
class AloneRun:
    start: float  # perf_counter() just before add_request
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    marks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens so far) per step with tokens

    @property
    def ttft(self) -> float:
        if not self.marks:
            raise RuntimeError("the request produced no token")
        return self.marks[0][0] - self.start


def run_alone(engine, prompt: str | list[int], params, on_text: Callable[[str], None] | None = None) -> AloneRun:
    """Run one request through `Engine.generate`; the first completion's tokens and text, with
    the time each step's tokens arrived."""
    run = AloneRun(time.perf_counter())
    parts: list[str] = []

    def seen(delta) -> None:
        now = time.perf_counter()
        for out in delta.outputs:
            if out.index != 0:
                continue
            if out.token_ids:
                run.token_ids.extend(out.token_ids)
                run.marks.append((now, len(run.token_ids)))
            if out.text:
                parts.append(out.text)
                if on_text is not None:
                    on_text(out.text)

    engine.generate([(f"alone-{next(_ids)}", prompt, params)], on_delta=seen)
    run.text = "".join(parts)
    return run
