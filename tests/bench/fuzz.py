"""A long fuzzing session (run by `make bench`, or by hand): the properties of tests/test_fuzz.py with many examples.

Mutated safetensors files, shard indexes, config.json files (every architecture, through `convert` up to
the first write), manifests (loaded and run, then verified), tokenizer files and chat templates. Prints the
inputs tried per parser, how many were accepted and how many refused with a MoeError, and pytest's report
of anything else (an exception other than MoeError, or an input taking longer than --seconds: a hang).

    python tests/bench/fuzz.py --examples 20000            # about an hour on two cores
    python tests/bench/fuzz.py --examples 500 -k manifests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000, help="examples per property")
    ap.add_argument("--seconds", type=float, default=30.0, help="longer than this on one input is a hang")
    ap.add_argument("-k", default=None, help="only the properties whose name matches (pytest -k)")
    ap.add_argument("--keep", type=Path, default=Path("fuzz-last-input.json"),
                    help="where the manifest input being tried is kept, for a crash that no exception reports")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "MOE_FUZZ_EXAMPLES": str(args.examples), "MOE_FUZZ_SECONDS": str(args.seconds),
               "MOE_FUZZ_REPORT": str(report), "MOE_HOME": str(Path(tmp) / "moe"), "MOE_FUZZ_KEEP": str(args.keep)}
        command = [sys.executable, "-m", "pytest", str(TESTS / "test_fuzz.py"), "-p", "no:cacheprovider", "-q",
                   "-W", "ignore", "--hypothesis-show-statistics", "--durations=0"]
        if args.k:
            command += ["-k", args.k]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=TESTS.parent, env=env)
        seconds = time.perf_counter() - started
        outcomes = json.loads(report.read_text()) if report.is_file() else {}
    print(f"\n{'parser':<40} {'inputs':>8} {'accepted':>9} {'refused':>8}")
    for name, counts in sorted(outcomes.items()):
        accepted, refused = counts.get("accepted", 0), counts.get("refused", 0)
        print(f"{name:<40} {accepted + refused:>8} {accepted:>9} {refused:>8}")
    total = sum(sum(c.values()) for c in outcomes.values())
    verdict = "no exception other than MoeError, no hang" if done.returncode == 0 else "FAILURES above"
    print(f"{total} inputs in {seconds / 60:.1f} min: {verdict}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
