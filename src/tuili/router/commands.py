"""`tuili router train|eval|explain`: fit a router file, measure it, show one decision."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import load_router
from .classifier import RouterClassifier, auc, fit, share_above
from .data import load_examples
from .features import features_of

log = logging.getLogger("tuili.router")


def add_arguments(sub) -> None:
    p = sub.add_parser("train", help="fit a router on labelled JSON lines")
    p.add_argument("data", help='JSON lines: {"prompt" or "messages", "label": "easy"|"hard"}')
    p.add_argument("-o", "--output", default="router.json", help="router file to write")
    p.add_argument("--strong-share", type=float, default=0.2, help="share of strong calls to calibrate for")
    p.add_argument("--l2", type=float, default=10.0, help="L2 penalty on the weights")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy, AUC and strong share of a router on labelled data")
    p.add_argument("data")
    _router_file_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="features, score and choice for one prompt")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    _router_file_args(p)
    p.set_defaults(func=cmd_explain)


def _router_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router-model", default=None, help="router file (default: the one shipped with tuili)")
    p.add_argument("--router-strong-share", type=float, default=None,
                   help="recalibrate the threshold for this share of strong calls")


def cmd_train(args: argparse.Namespace) -> int:
    examples = load_examples(args.data)
    clf = fit([e.features() for e in examples], [e.label for e in examples], args.strong_share, args.l2,
              info={"data": Path(args.data).name})
    clf.save(args.output)
    scores = [clf.score(e.features()) for e in examples]
    labels = [e.label for e in examples]
    print(f"trained on {len(examples)} examples ({sum(labels)} hard); AUC on them {auc(scores, labels):.3f}; "
          f"threshold {clf.threshold:.4f} for strong share {clf.strong_share:.2f}; wrote {args.output}")
    return 0


def evaluate(clf: RouterClassifier, data: str) -> dict:
    examples = load_examples(data)
    scores = [clf.score(e.features()) for e in examples]
    labels = [e.label for e in examples]
    chosen = [clf.is_hard(s) for s in scores]
    at_half = [s >= 0.5 for s in scores]
    return {
        "examples": len(examples), "hard_share": sum(labels) / len(labels),
        "auc": auc(scores, labels),
        "accuracy": sum(int(c) == y for c, y in zip(at_half, labels)) / len(labels),
        "accuracy_at_threshold": sum(int(c) == y for c, y in zip(chosen, labels)) / len(labels),
        "threshold": clf.threshold, "target_strong_share": clf.strong_share,
        "strong_share": share_above(scores, clf.threshold),
        "hard_sent_strong": sum(c and y for c, y in zip(chosen, labels)) / max(sum(labels), 1),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    clf = load_router(args.router_model, args.router_strong_share)
    r = evaluate(clf, args.data)
    print(f"examples           {r['examples']} ({r['hard_share']:.1%} labelled hard)")
    print(f"AUC                {r['auc']:.3f}")
    print(f"accuracy (p>=0.5)  {r['accuracy']:.1%}")
    print(f"threshold          {r['threshold']:.4f} (calibrated for strong share {r['target_strong_share']:.0%})")
    print(f"strong share       {r['strong_share']:.1%} at that threshold")
    print(f"accuracy there     {r['accuracy_at_threshold']:.1%}; hard prompts sent strong: "
          f"{r['hard_sent_strong']:.1%}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    clf = load_router(args.router_model, args.router_strong_share)
    x = features_of(prompt=args.prompt, max_tokens=args.max_tokens)
    score = clf.score(x)
    print(f"{'feature':<22}{'value':>10}{'logit':>10}")
    for name, value, contrib in clf.contributions(x):
        print(f"{name:<22}{value:>10.3f}{contrib:>+10.3f}")
    choice = "strong" if clf.is_hard(score) else "fast"
    print(f"score {score:.4f}  threshold {clf.threshold:.4f} (strong share {clf.strong_share:.0%})  -> {choice}")
    return 0
