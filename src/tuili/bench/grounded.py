"""An input-grounded workload: tasks whose answers repeat much of a text given in the prompt.

Each prompt is one chat message: a passage of the shipped corpus (paragraphs cut from a
random offset, `--input-len` tokens at most), then one of a few tasks that users send
with a document attached: rewrite or edit the passage, quote the sentences that answer a
question, summarise it quoting its key sentences, or continue from a quoted line. These are
the requests where prompt-lookup (n-gram) drafts pay off; the open-ended peers workload
(workload.py) is where they must not cost. The same seed gives the same prompts.
"""
from __future__ import annotations

import random

from ..data import corpus_text

TASKS = (
    "Rewrite the passage above exactly as it is, but in plain modern spelling.",
    "Copy the passage above, correcting any spelling or punctuation mistakes. Change nothing else.",
    "Quote, word for word, the first three sentences of the passage above.",
    "Which sentences of the passage above speak of {word}? Quote them exactly.",
    "Summarise the passage above in a few sentences, quoting its most important sentence word for word.",
    "Format the passage above as a bulleted list, one sentence per bullet, keeping the original words.",
)


def _paragraphs() -> list[str]:
    return [p.strip() for p in corpus_text().split("\n\n") if len(p.strip()) > 80]


def grounded_prompt_texts(tokenizer, num_prompts: int, lo: int, hi: int, seed: int) -> list[str]:
    """User messages of a passage (about lo..hi tokens of whole paragraphs, or one paragraph
    cut at hi) followed by a task that asks for its words back."""
    rng = random.Random(seed)
    paras = _paragraphs()
    prompts = []
    for i in range(num_prompts):
        target = rng.randint(lo, hi)
        start = rng.randrange(len(paras))
        text, n = [], 0
        for j in range(len(paras)):
            p = paras[(start + j) % len(paras)]
            ids = tokenizer(p, add_special_tokens=False).input_ids
            if n + len(ids) > target:
                if not text:
                    text.append(tokenizer.decode(ids[:target]))
                break
            text.append(p)
            n += len(ids)
        passage = "\n\n".join(text)
        words = [w.strip(".,;:!?\"'()").lower() for w in passage.split()]
        words = [w for w in words if len(w) > 5] or ["it"]
        task = TASKS[i % len(TASKS)].format(word=rng.choice(words))
        prompts.append(f"{passage}\n\n{task}")
    return prompts
