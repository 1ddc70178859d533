"""Luigi's Task.get_params remembered (params.py): the same answer as Luigi's, whatever changes."""

from __future__ import annotations

from collections.abc import Iterator

import luigi
import pytest

from luigi_celery import params

luigi.namespace("test_params", scope=__name__)


@pytest.fixture(autouse=True)
def remembered() -> Iterator[None]:
    params.install()
    yield
    params.uninstall()


def luigis(cls: type[luigi.Task]) -> list:
    return params._luigis_get_params(cls)


class Base(luigi.Task):
    a = luigi.Parameter()


class Child(Base):
    b = luigi.IntParameter(default=1)


def test_the_parameters_are_luigis_and_a_copy_each_time() -> None:
    first = Child.get_params()
    assert first == luigis(Child) and [n for n, _ in first] == ["a", "b"]
    for _ in range(2):  # (a caller may change its list, as Luigi's is new each call)
        Child.get_params().append(("junk", None))
    assert Child.get_params() == luigis(Child)
    assert Child(a="x").to_str_params() == {"a": "x", "b": "1"}


def test_a_parameter_added_replaced_or_removed_later_is_seen_on_the_class_or_a_base() -> None:
    class Grows(Base):
        pass

    assert [n for n, _ in Grows.get_params()] == ["a"]
    Grows.c = luigi.Parameter(default="c")  # type: ignore[attr-defined]
    assert [n for n, _ in Grows.get_params()] == ["a", "c"]
    Base.z = luigi.Parameter(default="z")  # type: ignore[attr-defined]
    try:
        assert [n for n, _ in Grows.get_params()] == ["a", "c", "z"]
    finally:
        del Base.z  # type: ignore[attr-defined]
    assert [n for n, _ in Grows.get_params()] == ["a", "c"]
    replaced = luigi.IntParameter(default=3)
    Grows.c = replaced  # type: ignore[attr-defined]
    assert dict(Grows.get_params())["c"] is replaced
    del Grows.c  # type: ignore[attr-defined]
    assert Grows.get_params() == luigis(Grows)
