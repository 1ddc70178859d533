"""The README's example, end to end: embedded, over Redis and RabbitMQ, with luigid.

Each run's outputs must equal, byte for byte, those of stock
``luigi --workers 4`` on the same pipeline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, clean_env, run_cli

PIPELINE = ("--module", "examples.sales", "Report", "--date", "2026-11-01")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stock_outputs(tmp_path_factory) -> dict[str, bytes]:
    """What stock Luigi makes of the example."""
    out = tmp_path_factory.mktemp("stock")
    done = subprocess.run(
        [str(BIN / "luigi"), *PIPELINE, "--Report-out", str(out), "--local-scheduler", "--workers", "4"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    outputs = tree(out)
    assert len(outputs) == 13  # 4 raw, 4 summaries, 3 dynamic product histories, top products, report
    return outputs


def assert_ran_everything(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:]
    assert "13 ran successfully" in result.stdout
    # and a run that went well warns of nothing, its shutdown included
    expected = "no coordination store is configured"  # (RabbitMQ alone and a rate limit: said at the start)
    warnings = [line for line in result.stdout.splitlines() if "WARNING" in line and expected not in line]
    assert not warnings, warnings


def test_the_readme_quotes_the_example_as_it_is():
    # The README's rate-limit and retry example is a piece of examples/sales.py, line for line.
    readme = (ROOT / "README.md").read_text()
    quoted = readme.split("From [`examples/sales.py`](examples/sales.py):", 1)[1].split("```python\n", 1)[1]
    quoted = quoted.split("```", 1)[0]
    assert "rate_limit" in quoted and "max_retries" in quoted
    assert quoted in (ROOT / "examples" / "sales.py").read_text()


@pytest.mark.e2e
def test_example_on_the_embedded_default_matches_stock_luigi(stock_outputs, tmp_path):
    # Given no broker configured
    # When the example runs with luigi-celery
    result = run_cli("run", *PIPELINE, "--Report-out", str(tmp_path), "--workers", "4")
    # Then it says once that it runs embedded, runs every task, and writes what stock Luigi writes
    assert result.stdout.count("running embedded") == 1
    assert_ran_everything(result)
    assert tree(tmp_path) == stock_outputs


@pytest.mark.e2e
def test_example_over_a_broker_with_two_workers_matches_stock_luigi(pool, stock_outputs, tmp_path):
    result = pool.run(*PIPELINE, "--Report-out", str(tmp_path), "--workers", "4")
    assert_ran_everything(result)
    assert "running embedded" not in result.stdout
    assert tree(tmp_path) == stock_outputs
    # the tasks really ran on the pool's workers, not in the dispatcher
    assert pool.logs().count("Worker") >= 13 and "Report_2026_11_01" in pool.logs()


@pytest.mark.e2e
def test_example_with_a_central_luigid(redis_pool, luigid, stock_outputs, tmp_path):
    result = redis_pool.run(*PIPELINE, "--Report-out", str(tmp_path), "--workers", "4", "--scheduler-url", luigid)
    assert_ran_everything(result)
    assert tree(tmp_path) == stock_outputs


@pytest.mark.e2e
def test_a_second_run_finds_everything_complete(redis_pool, tmp_path):
    first = redis_pool.run(*PIPELINE, "--Report-out", str(tmp_path))
    assert first.returncode == 0
    second = redis_pool.run(*PIPELINE, "--Report-out", str(tmp_path))
    assert second.returncode == 0
    # Then the second run finds the root complete and sends nothing
    assert "1 complete ones were encountered" in second.stdout
    assert "ran successfully" not in second.stdout
