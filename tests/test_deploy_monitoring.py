"""The Grafana dashboard and the Prometheus alert rules under deploy/: valid, unit-tested with
promtool, and reading only metrics the code exports. No broker needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "luigi-celery.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SOURCE = ROOT / "luigi_celery"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Metrics without a queue label, so panels cannot filter them by the queue selector.
NO_QUEUE_LABEL = {"luigi_celery_in_flight", "luigi_celery_worker_pool_processes"}
PROMQL_KEYWORDS = set("and or unless offset bool by without on ignoring group_left group_right".split())


# --- reading the files -------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run scripts/services (it installs Debian's prometheus package)")
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]


def rule_exprs() -> list[str]:
    """Each rule's ``expr`` in the alerts file, one-line or a ``|`` block (no YAML library here)."""
    lines = ALERTS.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not found:
            continue
        indent, value = len(found[1]), found[2].strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = "\n".join(block)
        exprs.append(value.strip("'\""))
    rules = re.findall(r"^\s*- (?:alert|record):", "\n".join(lines), re.MULTILINE)
    assert len(exprs) == len(rules), "could not read an expr for every rule in alerts.yml"
    return exprs


def exported_metrics() -> set[str]:
    """The metric names the code declares: its string literals ``"luigi_celery_..."``."""
    return {
        name
        for path in sorted(SOURCE.glob("*.py"))
        for name in re.findall(r'"(luigi_celery_[a-z_]+)"', path.read_text())
    }


def without_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def base_names(exprs: list[str]) -> set[str]:
    """The ``luigi_celery_*`` names in ``exprs`` without their ``_bucket/_sum/_count`` and ``_total``
    (strings left out: ``job="luigi_celery_worker"`` is no metric)."""
    names = {name for expr in exprs for name in re.findall(r"luigi_celery_[a-z_]+", without_strings(expr))}
    return {re.sub(r"_total$", "", re.sub(r"_(bucket|sum|count)$", "", name)) for name in names}


def selected_metrics(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects: a small tokenizer, enough for our files."""
    expr = without_strings(expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = re.findall(r"(?<![\w.$])[a-zA-Z_:][\w:]*\b(?!\s*\()", expr)  # not functions, not 15m or 1e3
    return {name for name in names if name.lower() not in PROMQL_KEYWORDS}


# --- the alert rules ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_promtool_accepts_the_alert_rules():
    run_promtool("check", "rules", str(ALERTS))


def series(name: str, job: str = "luigi_celery_worker", **labels: str) -> str:
    instance = "worker-1:9541" if job == "luigi_celery_worker" else "dispatcher:9540"
    matchers = ", ".join(f'{k}="{v}"' for k, v in {"job": job, "instance": instance, **labels}.items())
    return f"{name}{{{matchers}}}"


def at(eval_time: str, alertname: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": alertname, "exp_alerts": list(alerts)}


def scenario(input_series: dict[str, str], *checks: dict[str, Any]) -> dict[str, Any]:
    """One promtool test: ``input_series`` (series -> values, one a minute), then alerts expected at times."""
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in input_series.items()],
        "alert_rule_test": list(checks),
    }


def run_promtool_tests(tmp_path: Path, *scenarios: dict[str, Any]) -> None:
    """Unit-test the real alerts file with promtool (the test file is JSON, which is YAML)."""
    test_file = tmp_path / "alerts_test.yml"
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": list(scenarios)}
    test_file.write_text(json.dumps(spec, indent=2))
    run_promtool("test", "rules", str(test_file))


def failures(family: str, count: int) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "family": family},
        "exp_annotations": {
            "summary": f"{family} tasks failed",
            "description": f"About {count} attempt(s) of {family} ended FAILED on workers in the last 10 minutes. "
            "The worker logs hold the tracebacks.",
        },
    }


def stuck(queue: str, depth: int) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "critical", "queue": queue},
        "exp_annotations": {
            "summary": f"Queue {queue} is not moving",
            "description": f"{depth} task(s) wait in queue {queue}, no fewer than 15 minutes ago, and no worker "
            "finished a task from it in that time. Check that workers consume this queue, and whether they are all "
            "busy with tasks longer than 15 minutes (or a rate limit holds the queue).",
        },
    }


def no_workers(queue: str, depth: int) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "critical", "queue": queue},
        "exp_annotations": {
            "summary": f"Tasks wait in queue {queue} and no worker is online",
            "description": f"{depth} task(s) wait in queue {queue} and Prometheus has scraped no luigi-celery "
            "worker for 5 minutes. Start workers, or check the luigi_celery_worker scrape job.",
        },
    }


@pytest.mark.e2e
def test_the_failure_alert_fires_for_a_family_that_failed_and_not_for_one_that_did_not(tmp_path):
    runs = "luigi_celery_runs_total"
    run_promtool_tests(
        tmp_path,
        scenario(
            {
                # Given Fetch fails once at 6m, Load never fails,
                series(runs, family="Fetch", queue="default", outcome="FAILED"): "0x5 1x20",
                series(runs, family="Load", queue="default", outcome="FAILED"): "0x25",
                series(runs, family="Load", queue="default", outcome="DONE"): "0+1x25",
                # and Publish fails for the first time at 12m: its series starts at 1
                series(runs, family="Publish", queue="default", outcome="FAILED"): "_x12 1x13",
            },
            # Then each failure alerts for the 10 minutes after it, only for its family
            at("5m", "LuigiCeleryTaskFailures"),
            at("10m", "LuigiCeleryTaskFailures", failures("Fetch", 1)),
            at("15m", "LuigiCeleryTaskFailures", failures("Fetch", 1), failures("Publish", 1)),
            at("20m", "LuigiCeleryTaskFailures", failures("Publish", 1)),
            at("25m", "LuigiCeleryTaskFailures"),
        ),
    )


@pytest.mark.e2e
def test_the_stuck_queue_alert_fires_when_tasks_wait_20_minutes_and_no_task_finishes(tmp_path):
    depth = "luigi_celery_queue_depth"
    run_promtool_tests(
        tmp_path,
        scenario(
            {
                # Given no worker ever finishes a task (there is no runs_total at all),
                # and 5 tasks wait in "default" (the dispatcher and a worker report the same depth),
                series(depth, "luigi_celery_dispatcher", queue="default"): "5x40",
                series(depth, queue="default"): "5x40",
                # while "growing" grows, "draining" drains and "empty" stays empty
                series(depth, "luigi_celery_dispatcher", queue="growing"): "0+1x40",
                series(depth, "luigi_celery_dispatcher", queue="draining"): "40-1x39",
                series(depth, "luigi_celery_dispatcher", queue="empty"): "0x40",
            },
            # Then after 15 minutes of history and 5 of pending, the queues that hold tasks and do not shrink alert
            at("19m", "LuigiCeleryQueueStuck"),
            at("25m", "LuigiCeleryQueueStuck", stuck("default", 5), stuck("growing", 25)),
        ),
    )


@pytest.mark.e2e
def test_the_stuck_queue_alert_stays_quiet_while_tasks_of_that_queue_finish(tmp_path):
    depth, runs = "luigi_celery_queue_depth", "luigi_celery_runs_total"
    run_promtool_tests(
        tmp_path,
        scenario(
            {
                # Given "default" holds 5 tasks while its tasks finish every minute,
                series(depth, "luigi_celery_dispatcher", queue="default"): "5x40",
                series(runs, family="Fetch", queue="default", outcome="DONE"): "0+1x40",
                # "other" holds 3 that nobody takes (progress elsewhere does not count),
                series(depth, "luigi_celery_dispatcher", queue="other"): "3x40",
                # and "slow" holds 2 and finished its first task ever at 10m (a series starting at 1)
                series(depth, "luigi_celery_dispatcher", queue="slow"): "2x40",
                series(runs, family="Slow", queue="slow", outcome="DONE"): "_x10 1x30",
            },
            # Then "default" never alerts, and "slow" only 15 + 5 minutes after its last finish
            at("22m", "LuigiCeleryQueueStuck", stuck("other", 3)),
            at("31m", "LuigiCeleryQueueStuck", stuck("other", 3), stuck("slow", 2)),
        ),
    )


@pytest.mark.e2e
def test_the_no_workers_alert_fires_while_tasks_wait_and_no_worker_is_scraped(tmp_path):
    depth, pool = "luigi_celery_queue_depth", "luigi_celery_worker_pool_processes"
    run_promtool_tests(
        tmp_path,
        scenario(
            {
                # Given 3 tasks wait in "default" and none in "empty", and no worker exists
                series(depth, "luigi_celery_dispatcher", queue="default"): "3x20",
                series(depth, "luigi_celery_dispatcher", queue="empty"): "0x20",
            },
            # Then after 5 minutes the waiting queue alerts
            at("4m", "LuigiCeleryNoWorkers"),
            at("6m", "LuigiCeleryNoWorkers", no_workers("default", 3)),
        ),
        scenario(
            {
                # Given the same queue, and a worker with 4 pool processes that leaves at 11m
                series(depth, "luigi_celery_dispatcher", queue="default"): "3x30",
                series(pool): "4x10 stale",
            },
            # Then nothing alerts while the worker is there, and 5 minutes after it left the queue does
            at("10m", "LuigiCeleryNoWorkers"),
            at("15m", "LuigiCeleryNoWorkers"),
            at("17m", "LuigiCeleryNoWorkers", no_workers("default", 3)),
        ),
    )


@pytest.mark.e2e
def test_the_worker_down_alert_fires_for_a_worker_target_down_5_minutes(tmp_path):
    down = {
        "exp_labels": {"severity": "warning", "job": "luigi_celery_worker", "instance": "worker-1:9541"},
        "exp_annotations": {
            "summary": "Worker worker-1:9541 cannot be scraped",
            "description": "Prometheus could not scrape the luigi-celery worker at worker-1:9541 for 5 minutes: "
            "the worker is down, or its --metrics-port cannot be reached.",
        },
    }
    run_promtool_tests(
        tmp_path,
        scenario(
            {
                # Given worker-1 goes down at 6m, worker-2 stays up, and the dispatcher is gone (its run ended)
                series("up", instance="worker-1:9541"): "1x5 0x15",
                series("up", instance="worker-2:9541"): "1x20",
                series("up", "luigi_celery_dispatcher"): "0x20",
            },
            # Then only worker-1 alerts, 5 minutes later
            at("9m", "LuigiCeleryWorkerDown"),
            at("12m", "LuigiCeleryWorkerDown", down),
        ),
    )


# --- the metrics they read ---------------------------------------------------------------------


def test_the_dashboard_and_the_rules_read_only_metrics_the_code_exports():
    # Given the names the code declares
    exported = exported_metrics()
    board = dashboard()
    variables = [v.get("definition", "") for v in board["templating"]["list"]]
    # Then every luigi_celery name in a query or a rule is one of them
    assert base_names(dashboard_exprs(board) + variables) - exported == set()
    assert base_names(rule_exprs()) - exported == set()


def test_every_metric_the_code_exports_is_on_the_dashboard():
    assert exported_metrics() - base_names(dashboard_exprs(dashboard())) == set()


def test_up_is_the_only_metric_beyond_luigi_celery_ones_that_the_rules_and_dashboard_read():
    in_rules = {name for expr in rule_exprs() for name in selected_metrics(expr)}
    in_dashboard = {name for expr in dashboard_exprs(dashboard()) for name in selected_metrics(expr)}
    assert {name for name in in_rules if not name.startswith("luigi_celery_")} == {"up"}
    assert {name for name in in_dashboard if not name.startswith("luigi_celery_")} == set()


# --- the dashboard -----------------------------------------------------------------------------


def test_every_dashboard_panel_queries_the_chosen_datasource_and_has_its_own_id():
    board = dashboard()
    assert (board["uid"], board["title"]) == ("luigi-celery", "luigi-celery")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["queue"]["definition"] == "label_values(luigi_celery_queue_depth, queue)"
    assert variables["queue"]["multi"] and variables["queue"]["includeAll"]

    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, f"{panel['title']} {target['refId']}"


def test_dashboard_panels_fit_the_grid_without_overlapping():
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


@pytest.mark.e2e
def test_every_dashboard_query_is_valid_promql(tmp_path):
    # Given each query with Grafana's variables replaced by what they stand for,
    records = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$queue", ".*")
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know in {expr}"
            records.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    # When promtool reads them as recording rules
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    # Then it parses every one
    run_promtool("check", "rules", str(rules))


def test_dashboard_queries_on_metrics_with_a_queue_label_follow_the_queue_selector():
    for expr in dashboard_exprs(dashboard()):
        for name, matchers in re.findall(r"(luigi_celery_[a-z_]+)(\{[^}]*\})?", expr):
            if name not in NO_QUEUE_LABEL:
                assert 'queue=~"$queue"' in matchers, f"{name} ignores the queue selector in: {expr}"
