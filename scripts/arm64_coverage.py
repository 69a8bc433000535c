"""Which tests of the suite have passed on emulated aarch64, across the committed logs of scripts/arm64_suite.sh.

A whole-suite run under qemu takes hours on a small machine, so the aarch64 record is several logs
(results/arm64/suite*.log), each the `pytest -v` output of part of the suite. This reads them in the order of
their runs (the date in each log's first line) and keeps each test's latest outcome, then lists against the
suite as pytest collects it here: the tests with no aarch64 outcome, and those whose latest one is not
PASSED or SKIPPED.

    python -m scripts.arm64_coverage --out results/arm64/coverage.txt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTCOME = re.compile(r"^(tests/\S+?::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
STARTED = re.compile(r"^# edge-runtime test suite on aarch64 .*?, (\d{4}-\d\d-\d\d \d\d:\d\d) UTC")


def collected() -> list[str]:
    """The suite's test ids, as pytest collects them on this machine."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def latest_outcomes(logs: list[Path]) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """Test id -> (outcome, log) of its latest run, and the logs in the order they ran (start, name)."""
    runs = []
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        started = STARTED.match(lines[0]) if lines else None
        runs.append((started.group(1) if started else "?", log))
    latest: dict[str, tuple[str, str]] = {}
    for _, log in sorted(runs):
        for line in log.read_text(errors="replace").splitlines():
            if m := OUTCOME.match(line):
                latest[m.group(1)] = (m.group(2), log.name)
    return latest, [(start, log.name) for start, log in sorted(runs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", type=Path, default=ROOT / "results" / "arm64")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    logs = sorted(args.logs.glob("suite*.log"))
    if not logs:
        sys.exit(f"arm64_coverage: no suite*.log in {args.logs}: run scripts/arm64_suite.sh first")
    ids = collected()
    if not ids:
        sys.exit("arm64_coverage: pytest collected no tests here: run it from the repository's environment")
    latest, order = latest_outcomes(logs)
    missing = [i for i in ids if i not in latest]
    bad = [(i, *latest[i]) for i in ids if i in latest and latest[i][0] not in ("PASSED", "SKIPPED")]
    counts: dict[str, int] = {}
    for i in ids:
        if i in latest:
            counts[latest[i][0]] = counts.get(latest[i][0], 0) + 1
    lines = [f"# aarch64 (emulated) outcomes of the {len(ids)} tests pytest collects here, latest run first wins",
             "# logs, in the order they ran: " + ", ".join(f"{name} ({start} UTC)" for start, name in order),
             "latest outcomes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) +
             f"; not run on aarch64: {len(missing)}"]
    lines += [f"not run: {i}" for i in missing]
    lines += [f"{outcome} (latest, {log}): {i}" for i, outcome, log in bad]
    lines += [f"SKIPPED ({latest[i][1]}): {i}" for i in ids if i in latest and latest[i][0] == "SKIPPED"]
    lines.append("every test passed or was skipped on aarch64" if not missing and not bad else
                 f"{len(missing) + len(bad)} tests still to pass on aarch64")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
