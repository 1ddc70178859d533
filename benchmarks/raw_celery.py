"""The raw Celery baseline: the same broker and kind of worker as luigi-celery, no Luigi.

Worker (``benchmarks/scale.py`` starts it; from the repository root)::

    BENCH_RAW_BROKER=redis://127.0.0.1:6379/14 [BENCH_RAW_SETTINGS=luigi-celery] \\
        .venv/bin/celery -A benchmarks.raw_celery worker -Q QUEUE --concurrency 2 --pool prefork

Client: ``python -m benchmarks.raw_celery --broker URL --queue QUEUE --count N
[--seconds 0.2 | --chain]`` sends N tasks and prints one JSON line,
``{"seconds": ...}``: from the first send to the last completion.

Completions are counted without a result backend: each task INCRs a Redis key
the client names, and the client, once it has sent everything, polls that key
every millisecond.  A result backend would add a write per task on the worker
and a read per task on the client, measuring the backend more than Celery's
message path; luigi-celery needs none either (its replies share one queue per
run), and one INCR is about what its reply costs a worker.

Settings: ``stock`` is Celery's defaults (early acknowledgement, prefetch 4 per
process), JSON, results ignored: what "raw Celery" means in the issue.
``luigi-celery`` adds the delivery settings luigi-celery's guarantees need
(late acknowledgement, prefetch 1, no prefetch on Redis) and its task-sent
events, so the two rows separate Celery's own cost of those settings from
luigi-celery's overhead.  Like luigi-celery's, its workers send no task events
(luigi-celery turns them on only when Flower asks): they cost a worker about
40% of its throughput, which would flatter luigi-celery in the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import redis
from celery import Celery, chain

SETTINGS = ("stock", "luigi-celery")
_counters: dict[str, redis.Redis] = {}


def _count(counter_url: str, key: str) -> None:
    client = _counters.get(counter_url)
    if client is None:  # one connection per pool process, made after the fork
        client = _counters[counter_url] = redis.Redis.from_url(counter_url)
    client.incr(key)


def noop(counter_url: str, key: str) -> None:
    _count(counter_url, key)


def sleep(counter_url: str, key: str, seconds: float) -> None:
    time.sleep(seconds)
    _count(counter_url, key)


def make_app(broker_url: str, settings: str = "stock") -> Celery:
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")
    app = Celery("bench_raw", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )
    if settings == "luigi-celery":
        app.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            worker_disable_prefetch=broker_url.startswith(("redis", "sentinel")),
            worker_send_task_events=False,  # as luigi-celery's workers (luigi_celery/app.py)
            task_send_sent_event=True,
        )
    app.task(name="bench_raw.noop")(noop)
    app.task(name="bench_raw.sleep")(sleep)
    return app


def __getattr__(name: str) -> Any:
    # `celery -A benchmarks.raw_celery`: built from the environment when Celery asks, never at import.
    if name == "app":
        built = make_app(os.environ["BENCH_RAW_BROKER"], os.environ.get("BENCH_RAW_SETTINGS", "stock"))
        globals()["app"] = built
        return built
    raise AttributeError(name)


def send_and_wait(
    app: Celery,
    queue: str,
    count: int,
    counter_url: str,
    seconds: float = 0.0,
    as_chain: bool = False,
    timeout: float = 3600.0,
) -> float:
    """Send ``count`` tasks to ``queue`` and wait until all ran; return the seconds taken.

    ``as_chain`` sends one Celery chain of ``count`` no-op tasks instead (each
    task's worker sends the next), the raw counterpart of a Luigi chain.
    """
    counter = redis.Redis.from_url(counter_url)
    key = f"bench-raw:{uuid.uuid4().hex}"
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)  # connect before the clock starts
        started = time.perf_counter()
        if as_chain:
            link = app.signature("bench_raw.noop", (counter_url, key), immutable=True, queue=queue)
            chain(link.clone() for _ in range(count)).apply_async(producer=producer)
        else:
            name = "bench_raw.sleep" if seconds else "bench_raw.noop"
            args = (counter_url, key, seconds) if seconds else (counter_url, key)
            for _ in range(count):
                app.send_task(name, args, queue=queue, producer=producer)
        while int(counter.get(key) or 0) < count:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{int(counter.get(key) or 0)} of {count} tasks ran in {timeout} s")
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
    counter.delete(key)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="send N raw Celery tasks and time them to the last completion")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=0.0, help="each task sleeps this long (0: a no-op)")
    parser.add_argument("--chain", action="store_true", help="one Celery chain of COUNT no-op tasks")
    parser.add_argument("--settings", choices=SETTINGS, default="stock")
    parser.add_argument("--counter-url", help="Redis for the completion counter (default: the broker)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    app = make_app(args.broker, args.settings)
    try:
        elapsed = send_and_wait(
            app, args.queue, args.count, args.counter_url or args.broker, args.seconds, args.chain, args.timeout
        )
    except TimeoutError as e:
        print(f"raw Celery: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": elapsed, "count": args.count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
