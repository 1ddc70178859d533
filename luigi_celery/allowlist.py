"""Which modules may be imported because a message names them.

A worker imports the module a task message names only when it is in its
allowlist (``--include``); a dispatcher imports the module of a dynamic
dependency a reply names only when it is one of the run's own (or in their
packages, or in ``task_modules``). Importing a module runs its code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from luigi_celery import message as m

logger = logging.getLogger(__name__)


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """True when ``module`` is in the allowlist or inside an allowed package."""
    return any(module == a or module.startswith(a + ".") for a in allowed)


class RunModules:
    """The modules of a run's tasks, their packages, and ``task_modules``: what its replies may name."""

    def __init__(self, task_modules: Iterable[str]) -> None:
        self._modules = frozenset(task_modules)

    def add(self, module: str) -> None:
        """Allow ``module``, whose task the run sends (and its package: dynamic dependencies often
        come from a sibling module)."""
        if module not in self._modules:
            self._modules = self._modules | {name for name in (module, module.rpartition(".")[0]) if name}

    def check(self, reply: m.ResultMessage) -> m.ResultMessage:
        """``reply``, or a FAILED one when it names a dynamic dependency from a module outside the run."""
        modules = self._modules
        refused = sorted({mod for mod, _, _ in reply.new_deps if not module_allowed(mod, modules)})
        if not refused:
            return reply
        expl = (
            f"{reply.task_id}: refused its dynamic dependencies from module(s) {', '.join(map(repr, refused))}: "
            f"not a module (or package) of this run's tasks nor in task_modules (LUIGI_CELERY_TASK_MODULES)"
        )
        logger.error("%s", expl)
        return dataclasses.replace(reply, status=m.FAILED, expl=expl, new_deps=[], missing=[])
