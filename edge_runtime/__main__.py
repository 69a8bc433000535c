"""`python -m edge_runtime` and the `edge-runtime` command: the CLI, or one line naming what is not installed."""

from __future__ import annotations

import sys


def main() -> int:
    from edge_runtime.errors import MissingDependency

    try:
        from edge_runtime.cli import main as cli_main
    except MissingDependency as e:  # e.g. no OpenCV on a Termux install: say what to install, exit 2
        print(f"edge-runtime: error: {e}", file=sys.stderr)
        return 2
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
