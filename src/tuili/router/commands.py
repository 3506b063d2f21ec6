"""`tuili router train|eval|explain`: fit a router file, measure it, show one decision."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import load_router
from .classifier import RouterClassifier, auc, fit, hidden_feature_names, share_above
from .data import load_examples
from .features import features_of
from . import probe as P

log = logging.getLogger("tuili.router")


def add_arguments(sub) -> None:
    p = sub.add_parser("train", help="fit a router on labelled JSON lines")
    p.add_argument("data", help='JSON lines: {"prompt" or "messages", "label": "easy"|"hard"}')
    p.add_argument("-o", "--output", default="router.json", help="router file to write")
    p.add_argument("--strong-share", type=float, default=0.2, help="share of strong calls to calibrate for")
    p.add_argument("--l2", default="10", help="L2 penalty on the weights; several (comma-separated): "
                                               "the best by out-of-fold AUC on the training data")
    p.add_argument("--signal", choices=("features", "probe"), default="features",
                   help="features: surface features of the text; probe: the fast model's hidden state")
    _probe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy, AUC and strong share of a router on labelled data")
    p.add_argument("data")
    _router_file_args(p)
    p.add_argument("--model", default=None, help="probe: the fast model to read (default: the probe's own)")
    p.add_argument("--dtype", default="float32", help="probe: the fast model's dtype here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="features, score and choice for one prompt")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    _router_file_args(p)
    p.add_argument("--model", default=None, help="probe: the fast model to read (default: the probe's own)")
    p.set_defaults(func=cmd_explain)


def _router_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router-model", default=None, help="router file (default: the one shipped with tuili)")
    p.add_argument("--router-strong-share", type=float, default=None,
                   help="recalibrate the threshold for this share of strong calls")


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="probe: the fast model it reads")
    p.add_argument("--layer", type=int, default=P.DEFAULT_LAYER, help="probe: layers of the model before the read-out")
    p.add_argument("--dtype", default="float32", help="probe: the fast model's dtype while fitting")


def _rows(examples) -> list[tuple]:
    return [(e.prompt, e.messages) for e in examples]


def cmd_train(args: argparse.Namespace) -> int:
    examples = load_examples(args.data)
    labels = [e.label for e in examples]
    try:
        penalties = [float(v) for v in str(args.l2).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--l2: numbers separated by commas, got {args.l2!r}") from None
    info: dict = {"data": Path(args.data).name}
    names = None
    if args.signal == "probe":
        from ..engine.llm import LLM

        llm = LLM(args.model, dtype=args.dtype)
        log.info("reading layer %d of %s for %d examples", args.layer, llm.engine.model_name, len(examples))
        x = P.hidden_states(llm, _rows(examples), args.layer, progress=True)
        info.update(signal=P.SIGNAL, model=args.model, layer=args.layer, dtype=args.dtype,
                    model_shape=P.shape_of(llm.engine.model_config))
        names = hidden_feature_names(len(x[0]))
    else:
        x = [e.features() for e in examples]
    best = None
    for l2 in penalties:  # out-of-fold AUC picks the penalty; the threshold comes from the same scores
        clf = fit(x, labels, args.strong_share, l2, info=info, names=names)
        oof = clf.info.get("oof_auc", float("nan"))
        if len(penalties) > 1:
            print(f"l2 {l2:g}: out-of-fold AUC {oof:.3f}")
        if best is None or oof > best.info.get("oof_auc", float("nan")):
            best = clf
    clf = best
    clf.save(args.output)
    scores = [clf.score(row) for row in x]
    print(f"trained on {len(examples)} examples ({sum(labels)} hard); AUC on them {auc(scores, labels):.3f}, "
          f"out of fold {clf.info['oof_auc']:.3f} (l2 {clf.info['l2']:g}); threshold {clf.threshold:.4f} for "
          f"strong share {clf.strong_share:.2f}; wrote {args.output}")
    return 0


def evaluate(clf: RouterClassifier, data: str, llm=None) -> dict:
    examples = load_examples(data)
    if P.is_probe(clf):
        x = P.hidden_states(llm, _rows(examples), clf.info["layer"])
    else:
        x = [e.features() for e in examples]
    scores = [clf.score(row) for row in x]
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
    llm = P.load_fast_llm(clf, args.model, args.dtype) if P.is_probe(clf) else None
    r = evaluate(clf, args.data, llm)
    signal = f"probe (layer {clf.info['layer']} of {clf.info.get('model')})" if P.is_probe(clf) else "features"
    print(f"signal             {signal}")
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
    # without a file: the shipped probe, the signal `tuili serve` uses when its fast model is the probe's
    clf = load_router(args.router_model or P.DEFAULT_PROBE, args.router_strong_share)
    if P.is_probe(clf):
        return _explain_probe(args, clf)
    x = features_of(prompt=args.prompt, max_tokens=args.max_tokens)
    score = clf.score(x)
    print("signal: features of the text")
    print(f"{'feature':<22}{'value':>10}{'logit':>10}")
    for name, value, contrib in clf.contributions(x):
        print(f"{name:<22}{value:>10.3f}{contrib:>+10.3f}")
    choice = "strong" if clf.is_hard(score) else "fast"
    print(f"score {score:.4f}  threshold {clf.threshold:.4f} (strong share {clf.strong_share:.0%})  -> {choice}")
    return 0


def _explain_probe(args: argparse.Namespace, clf: RouterClassifier) -> int:
    """The probe's view of one prompt, and the surface features' view beside it."""
    import time

    llm = P.load_fast_llm(clf, args.model)
    layer = clf.info["layer"]
    ids = P.prompt_ids(llm.get_tokenizer(), args.prompt, None)
    start = time.perf_counter()
    hidden = P.hidden_states(llm, [(args.prompt, None)], layer)[0]
    took = time.perf_counter() - start
    score = clf.score(hidden)
    choice = "strong" if clf.is_hard(score) else "fast"
    print(f"signal: probe, the fast model's hidden state after layer {layer} at the prompt's last token "
          f"({llm.engine.model_name}, {len(hidden)} dimensions)")
    print(f"prompt: {len(ids)} tokens through the chat template; prefill + 1 token took {took * 1000:.0f} ms here")
    top = clf.contributions(hidden)[:5]
    print("largest terms of the logit: " + ", ".join(f"{n} {c:+.2f}" for n, _, c in top))
    print(f"probe score {score:.4f}  threshold {clf.threshold:.4f} (strong share {clf.strong_share:.0%})  -> {choice}")
    features = load_router(P.DEFAULT_FEATURES, args.router_strong_share)
    fs = features.score(features_of(prompt=args.prompt, max_tokens=args.max_tokens))
    print(f"surface features (fallback) score {fs:.4f}  threshold {features.threshold:.4f}  -> "
          f"{'strong' if features.is_hard(fs) else 'fast'}")
    return 0
