"""`python -m tuili.plan MODEL ...`: the capacity planner (see tuili.plan.cli)."""
import sys

from .cli import main

sys.exit(main())
