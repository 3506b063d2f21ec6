"""`tuili eval perplexity`: perplexity of one engine setting on a fixed text, optionally
beside the full-precision model (top-1 agreement, logit error); engine/evaluate.py scores."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .results import append_jsonl


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the shipped public-domain corpus)")
    p.add_argument("--max-text-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (no overlap)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk size inside a window")
    p.add_argument("--compare", action="store_true",
                   help="also run the full-precision model and report top-1 agreement and logit error")
    p.add_argument("--output", default=None, help="JSON lines file to append the result to")


def run_from_args(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from ..engine.engine import Engine
    from ..engine.evaluate import DEFAULT_TEXT, evaluate

    path = Path(args.text) if args.text else DEFAULT_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"--text: no such file {path}")
    engine = Engine(args.model, **options)
    ids = engine.encode(path.read_text(encoding="utf-8"))[: args.max_text_tokens]
    reference = None
    if args.compare:
        reference = Engine(args.model, **{**options, "quantization": "none", "kv_cache_dtype": "auto"})
    result = evaluate(engine, ids, window=args.window, chunk=args.chunk, reference=reference)
    record = {"model": engine.model_name, "text": path.name, "dtype": str(engine.dtype).removeprefix("torch."),
              "quantization": options["quantization"], "kv_cache_dtype": options["kv_cache_dtype"],
              "window": args.window, **result.to_dict()}
    print(json.dumps(record))
    if args.output:
        append_jsonl(args.output, record)
    return 0
