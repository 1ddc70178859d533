"""Can this task travel? A task crosses the broker as (module, family, str params).

That is the triple Luigi itself uses for dynamic dependencies; :func:`check_dispatchable`
makes sure a task can be rebuilt from it, exactly, on another machine before it is sent.
"""

from __future__ import annotations

import luigi
from luigi.parameter import ParameterVisibility
from luigi.task_register import Register, TaskClassException

from luigi_celery.errors import DispatchRefused


def _check_class(task_cls: type[luigi.Task], local_ok: bool = False) -> None:
    family = task_cls.get_task_family()
    if task_cls.__module__ == "__main__":
        raise DispatchRefused(
            f"{family} is defined in __main__, which a worker cannot import: move it to a module and pass --module"
        )
    if "<locals>" in task_cls.__qualname__ and not local_ok:
        raise DispatchRefused(
            f"{family} is defined inside a function ({task_cls.__qualname__}), "
            "so a worker cannot import it: define it at module level"
        )
    try:
        registered = Register.get_task_cls(family)
    except TaskClassException as e:
        where = f" (it is defined inside a function, {task_cls.__qualname__}: define it at module level)"
        where = where if "<locals>" in task_cls.__qualname__ else ""
        raise DispatchRefused(f"{family} cannot be looked up by its family name on a worker: {e}{where}") from e
    if registered is not task_cls:
        raise DispatchRefused(f"{family} names another class in Luigi's registry ({registered.__module__})")


def check_dispatchable(task: luigi.Task, local_ok: bool = False) -> dict[str, str]:
    """Return the task's str params if a worker can rebuild exactly this task.

    Raises :class:`DispatchRefused`, naming the task and the parameter, when
    the class is not importable by name or a parameter does not survive the
    trip through its string form (the only form that crosses the broker).
    ``local_ok`` lets a class defined inside a function through: the embedded
    worker, on this machine, finds it if importing its module defines it.
    """
    _check_class(type(task), local_ok)
    for name, param in task.get_params():
        value = task.param_kwargs[name]
        if param.visibility == ParameterVisibility.PRIVATE:
            raise DispatchRefused(
                f"{task.task_id}: parameter {name!r} is PRIVATE; luigi-celery does not send private "
                "values over the broker: read the secret from config or the environment inside run()"
            )
        try:
            text = param.serialize(value)
            back = param.normalize(param.parse(text))
            survives = isinstance(text, str) and back == value
        except Exception as e:  # a parse error is the same answer: it does not survive
            survives = False
            text = f"<{type(e).__name__}: {e}>"
        if not survives:
            raise DispatchRefused(
                f"{task.task_id}: parameter {name!r} = {value!r} ({type(value).__name__}) does not survive "
                f"the string round trip ({type(param).__name__} gives back {text!r}); use a parameter "
                "type that parses it (e.g. ListParameter, TupleParameter, OptionalParameter, IntParameter)"
            )
    return dict(task.to_str_params())
