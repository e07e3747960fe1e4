"""Kill `loramem write` with SIGKILL at seeded random points of a 4-module write, 20 times, and count the
trials the memory survived.

    OMP_NUM_THREADS=1 python benchmarks/crash_trials.py [--trials 20] [--seed 0] [--json]

Each trial is benchmarks/crash.py's kill_trial on a fresh memory: the write (4 facts, a module each, on the
tiny model) is killed once its write lock is taken or after 1-3 commits (drawn at random), plus a random
0-1.5 s, or (half the trials) once the next module is being saved, plus 0-50 ms; then a reader must find whole modules only, each answering its fact, and the same write run again
must complete the memory without retraining a committed module and past the dead writer's lock file.
A trial survives when every check passes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from common import report
from crash import MAX_DELAY, MAX_STAGING_DELAY, PEOPLE, kill_trial

from loramem.models import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng, base, rows = random.Random(args.seed), load_base("tiny"), []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.trials):
            wait, staging = rng.randrange(len(PEOPLE)), rng.random() < 0.5
            delay = rng.uniform(0, MAX_STAGING_DELAY if staging else MAX_DELAY)
            point = f"{'a module being saved after ' if staging else ''}{wait} commits + {delay:.2f} s"
            try:
                row = asdict(kill_trial(Path(tmp) / f"trial-{n}", wait, delay, base, staging)) | {"survived": True}
            except AssertionError:
                row = {"wait_modules": wait, "staging": staging, "delay": delay, "survived": False,
                       "error": traceback.format_exc()}
            rows.append(row)
            if not args.json:
                print(f"trial {n + 1:2}: {point} -> "
                      + (f"killed with {row['committed']} committed, stale lock {row['stale_lock']}, "
                         f"leftovers {row['leftovers'] + row['create_leftovers']}, {row['seconds']:.0f} s"
                         if row["survived"] else f"FAILED\n{row['error']}"), flush=True)
    survived = sum(row["survived"] for row in rows)
    killed = [row for row in rows if row.get("killed")]
    summary = {"survived": survived, "total": len(rows), "killed": len(killed),
               "killed_between_first_and_last_commit": sum(0 < row["committed"] < len(PEOPLE) for row in killed),
               "left_staging_or_unlisted_folders": sum(bool(row["leftovers"]) for row in killed),
               "seconds": round(time.perf_counter() - started), "trials": rows}

    def table() -> None:
        print(f"survived {survived}/{len(rows)}: {len(killed)} killed by SIGKILL (the rest had finished), "
              f"{summary['killed_between_first_and_last_commit']} with some but not all modules committed, "
              f"{summary['left_staging_or_unlisted_folders']} leaving a staging or unlisted module folder; "
              f"{summary['seconds']} s")

    report(summary, args.json, table)
    sys.exit(0 if survived == len(rows) else 1)


if __name__ == "__main__":
    main()
