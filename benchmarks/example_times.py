"""Time the README's example: stock Luigi, luigi-celery embedded, and over Redis.

    .venv/bin/python benchmarks/example_times.py [--repeat 5] [--broker redis://127.0.0.1:6379/12]

Each variant runs the example from scratch (fresh output folder) ``--repeat``
times; the table shows the median and the range of wall-clock seconds for
the whole command, start-up included.  The Redis variant runs against two
``luigi-celery worker`` processes (2 prefork processes each) started here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PIPELINE = ["--module", "examples.sales", "Report", "--date", "2026-11-01", "--workers", "4"]


def timed(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([*command, "--Report-out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return elapsed


def start_workers(broker: str, queue: str) -> list[subprocess.Popen]:
    workers = []
    for i in range(2):
        workers.append(
            subprocess.Popen(
                [str(BIN / "luigi-celery"), "worker", "--broker", broker, "--queue", queue,
                 "--include", "examples.sales", "--concurrency", "2", "--loglevel", "WARNING",
                 "--hostname", f"bench{i}-{queue}@%h"],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
    time.sleep(4)  # let both workers connect
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    variants = {
        "luigi --workers 4 (stock)": [str(BIN / "luigi"), *PIPELINE, "--local-scheduler"],
        "luigi-celery, embedded": [str(BIN / "luigi-celery"), "run", *PIPELINE],
        "luigi-celery, Redis, 2 workers": [str(BIN / "luigi-celery"), "run", "--broker", args.broker, "--queue", queue,
                                           *PIPELINE],
    }  # fmt: skip
    workers = start_workers(args.broker, queue)
    try:
        with tempfile.TemporaryDirectory() as folder:
            print(f"{'variant':34} {'median s':>9} {'min s':>7} {'max s':>7}")
            for name, command in variants.items():
                times = [timed(command, Path(folder, "out")) for _ in range(args.repeat)]
                print(f"{name:34} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait()


if __name__ == "__main__":
    main()
