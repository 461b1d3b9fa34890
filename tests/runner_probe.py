"""A command for the runner tests (tests/integration/test_runner.py): what did it get, and from whom?

    python -m tests.runner_probe [--exit N] [--stdin] [--sleep S] [--pid-file F] [ARG ...]

Prints JSON (whether the pool's runner ran it, its arguments, folder, `PROBE` variable, what it read
from standard input, its PID), writes a line to standard error and exits with `--exit`.
"""

from __future__ import annotations

if __name__ == "__main__":
    from infra.runner import hand_off

    hand_off(__spec__)

import argparse
import json
import os
import sys
import time
from pathlib import Path

import infra.runner


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--stdin", action="store_true")
    parser.add_argument("--sleep", type=float, default=0)
    parser.add_argument("--pid-file", type=Path)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.pid_file:
        args.pid_file.write_text(str(os.getpid()))
    time.sleep(args.sleep)
    seen = {
        "inside": infra.runner.INSIDE,
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "probe": os.environ.get("PROBE"),
        "stdin": sys.stdin.read() if args.stdin else None,
        "pid": os.getpid(),
    }
    print(json.dumps(seen))
    print("probe: to standard error", file=sys.stderr)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
