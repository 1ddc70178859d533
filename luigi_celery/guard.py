"""What a worker takes from the broker, where anyone who can publish may publish.

A luigi-celery worker runs one task, ``luigi_celery.execute``, from plain JSON
messages the dispatcher sent. Everything else a message could ask of Celery is
refused here, in the worker's main process, before a pool process sees it:

- compressed messages (kombu would inflate any of them, whatever
  ``accept_content`` says: a small message can inflate past the memory of the
  machine), and messages over :data:`luigi_celery.message.MAX_MESSAGE_BYTES`;
- Celery's built-in tasks (``celery.group``, ``celery.chord_unlock``, ...) and
  any other task: the app registers ``luigi_celery.execute`` alone;
- callbacks, errbacks, chains, chords and groups on an execute message;
- a message not signed with the shared secret, when one is set;
- remote-control commands other than :data:`CONTROL_COMMANDS` (``shutdown``,
  ``pool_restart``, ``rate_limit``, ... are not answered).

A refused task message is rejected without requeueing (it is gone, not
retried forever) and logged once.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.app.registry import TaskRegistry
from celery.worker.consumer.control import Control
from celery.worker.strategy import default as default_strategy
from kombu import compression

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.errors import MessageError, RefusedCompression

logger = logging.getLogger(__name__)

# The remote-control commands a worker answers: what luigi-celery needs (ping and
# active_queues for `check` and the dispatcher's queue check, revoke for an interrupted
# run, hello for Celery's mingle) and what Flower reads (its worker pages) or asks
# (task events on and off). Each dump_* is another name of the inspect command after it.
CONTROL_COMMANDS = frozenset(
    {
        "ping", "hello", "clock", "heartbeat", "stats", "conf", "dump_conf", "active_queues",
        "registered", "dump_tasks", "active", "dump_active", "reserved", "dump_reserved",
        "scheduled", "dump_schedule", "revoked", "dump_revoked", "query_task",
        "enable_events", "disable_events", "revoke",
    }
)  # fmt: skip

# Parts of a Celery message that make a worker run or publish something else after (or
# around) the task: luigi-celery never sends them.
_EMBEDDED_WORK = ("callbacks", "errbacks", "chain", "chord")


def _refuse(body: bytes) -> bytes:
    raise RefusedCompression("compressed messages are refused (luigi-celery never compresses)")


def refuse_compressed_messages() -> None:
    """Make kombu, in this process, refuse every compressed message instead of inflating it.

    kombu inflates a message as it receives it, before any check of Celery's; a
    refused one is logged by Celery as a message it cannot decode, and dropped.
    (Process-wide: it changes kombu's registry of decompressors, which luigi-celery's
    worker and dispatcher processes use for nothing else.)
    """
    for content_type in list(compression._decoders):
        compression._decoders[content_type] = _refuse


class OnlyExecute(TaskRegistry):
    """A task registry that holds ``luigi_celery.execute`` and nothing else.

    Celery adds its built-in tasks to every app, and ``shared_task`` adds a
    module's tasks to every app; a message naming any of them is "unregistered"
    here, and dropped.
    """

    def __setitem__(self, name: str, task: Any) -> None:
        if name == m.TASK_NAME:
            super().__setitem__(name, task)


def refusal(message: Any, secret: str | None) -> str | None:
    """Why the execute message ``message`` must not run, or None (it goes on to the pool)."""
    if message.headers.get("compression"):  # (kombu has refused to inflate it already)
        return "a compressed message"
    size = len(message.body or b"")
    if size > m.MAX_MESSAGE_BYTES:
        return f"a message of {size} bytes (at most {m.MAX_MESSAGE_BYTES})"
    if message.headers.get("group"):
        return "a message in a Celery group"
    try:
        body = message.decode()
    except Exception:
        return None  # not JSON, or not allowed: the request refuses it, as for any task
    if not (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[2], dict)):
        return None  # not protocol 2's [args, kwargs, embed]: execute itself rejects it
    embedded = [name for name in _EMBEDDED_WORK if body[2].get(name)]
    if embedded:
        return f"a message with {', '.join(embedded)} (luigi-celery sends none)"
    kwargs = body[1] if isinstance(body[1], dict) else {}
    try:
        signing.verify(kwargs.get("message"), secret)
    except MessageError as e:
        return str(e)
    return None


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's strategy for the execute task, with :func:`refusal` in front of it."""
    handle = default_strategy(task, app, consumer, **kwargs)
    secret = getattr(task, "secret", None)
    connection_errors = consumer.connection_errors

    def guarded(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any) -> Any:
        problem = refusal(message, secret)
        if problem is None:
            return handle(message, body, ack, reject, callbacks, **options)
        logger.error("rejected %s: %s", message.headers.get("id"), problem)
        reject(logger, connection_errors, False)  # not requeued: it would only be refused again
        return None

    return guarded


class _AllowedCommands(dict[str, Any]):
    """Celery's command handlers, the allowed ones only; any other command is refused in one log line."""

    def __missing__(self, name: str) -> Any:
        def refused(state: Any, **arguments: Any) -> dict[str, str]:
            logger.warning("refused remote-control command %.100r: luigi-celery workers do not answer it", name)
            return {"error": f"refused: luigi-celery workers do not answer {name!r}"}

        return refused


class RestrictControl(bootsteps.Step):
    """The worker answers :data:`CONTROL_COMMANDS` only (a consumer bootstep of luigi-celery's app)."""

    requires = (Control,)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        node = parent.blueprint.steps[Control.name].box.node
        node.handlers = _AllowedCommands({name: fn for name, fn in node.handlers.items() if name in CONTROL_COMMANDS})
        super().__init__(parent, **kwargs)
