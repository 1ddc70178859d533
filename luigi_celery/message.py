"""What crosses the broker: the task message, the replies, and their checks.

Every message is a JSON object with a protocol version ``v`` and a ``kind``.
Nothing here ever unpickles: a message is plain data, validated field by
field, and anything that does not fit raises :class:`MessageError`.

Anyone who can publish on the broker can publish a message, so a reply counts
only when it answers an attempt the dispatcher really sent: each attempt
carries a random ``token``, part of its Celery id, which the worker echoes.
With a shared secret (``LUIGI_CELERY_SECRET``) every message and reply also
carries an HMAC of its content (signing.py). Whether a task can travel at all
is dispatchable.py's question.

"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, TypeVar

from luigi_celery.errors import MessageError

PROTOCOL_VERSION = 2  # 2: the per-attempt token and the optional signature
TASK_NAME = "luigi_celery.execute"

# Luigi statuses a worker may report back.
DONE, FAILED, PENDING = "DONE", "FAILED", "PENDING"
STATUSES = frozenset({DONE, FAILED, PENDING})

# Status updates a task can make from inside run(), with the type of the value.
STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "status_message": (str,),
    "progress_percentage": (int, float),
    "tracking_url": (str,),
    "decrease_running_resources": (dict,),
    # Not Luigi's: the task waits on purpose (a retry, a rate limit) for this many seconds.
    "retry_in": (int, float),
    # Not Luigi's: the task has been running on this host for a moment (queued and running differ).
    "started": (str,),
    # The task's response to a message from the scheduler: {"message_id": str, "response": any JSON}.
    "scheduler_message_response": (dict,),
}

# A timed-out task is reported FAILED with event "timeout", so the dispatcher
# can fire Luigi's TIMEOUT event exactly where stock Luigi fires it.
EVENTS = frozenset({"timeout"})

# A dispatcher's session id is 32 hex digits; a message's may be no longer than this.
MAX_SESSION_LENGTH = 64

# A task message or a reply is a few hundred bytes of JSON, a few KiB with large parameters or a
# long traceback: past this it is refused before it is decoded.
MAX_MESSAGE_BYTES = 1024 * 1024


M = TypeVar("M")

_TOKEN = re.compile(r"[0-9a-f]{32}")


def new_token() -> str:
    """An attempt's token: 128 random bits, so nobody can guess a reply into a run."""
    return secrets.token_hex(16)


def celery_task_id(luigi_task_id: str, attempt: int, token: str) -> str:
    """The Celery task id for one attempt at one Luigi task.

    A readable prefix of the Luigi task id (they can be long), a digest of the
    whole id (so a restarted dispatcher finds its task among the attempts the
    coordination store saw started), the attempt, and the attempt's random
    token: nobody can revoke or answer an attempt whose id they did not see.
    """
    return f"{luigi_task_id[:80]}.{task_digest(luigi_task_id)}.{attempt}.{token}"


def task_digest(luigi_task_id: str) -> str:
    return hashlib.sha1(luigi_task_id.encode()).hexdigest()[:16]


class CeleryId(NamedTuple):
    digest: str
    attempt: int
    token: str


def parse_celery_id(celery_id: str) -> CeleryId | None:
    """The parts of an id made by :func:`celery_task_id`, else None."""
    parts = celery_id.rsplit(".", 3)
    if len(parts) != 4 or len(parts[1]) != 16 or not parts[2].isdigit() or not _TOKEN.fullmatch(parts[3]):
        return None
    return CeleryId(parts[1], int(parts[2]), parts[3])


def _require(data: Mapping[str, Any], name: str, types: tuple[type, ...], *, nullable: bool = False) -> Any:
    if name not in data:
        raise MessageError(f"missing field {name!r}")
    value = data[name]
    if value is None and nullable:
        return None
    # bool is an int in Python; never accept it where a number is expected.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = "/".join(t.__name__ for t in types)
        raise MessageError(f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _present(data: Mapping[str, Any], name: str) -> Any:
    """A field that may hold any JSON value (it came out of a JSON decoder)."""
    if name not in data:
        raise MessageError(f"missing field {name!r}")
    return data[name]


def _check_envelope(data: object, kinds: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise MessageError(f"message must be a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise MessageError(f"unsupported message version {version!r} (this worker speaks {PROTOCOL_VERSION})")
    if data.get("kind") not in kinds:
        raise MessageError(f"unknown message kind {data.get('kind')!r}")
    return data


def _str_dict(value: Mapping[str, Any], name: str) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MessageError(f"field {name!r} must map strings to strings")
    return dict(value)


@dataclass(frozen=True)
class TaskMessage:
    """One Luigi task to run, as the dispatcher publishes it."""

    task_id: str
    module: str
    family: str
    params: dict[str, str]
    attempt: int
    run_id: str
    reply_to: str
    # The dispatcher's Luigi [worker] settings that change how a task runs.
    check_unfulfilled_deps: bool = True
    check_complete_on_run: bool = False
    # [worker] cache_task_completion: a worker remembers, for this dispatcher's session, the
    # tasks it saw complete, and does not check them again (as Luigi's worker does in its run).
    cache_task_completion: bool = False
    # Luigi's worker_timeout for this task (None: no limit); Celery enforces it.
    worker_timeout: float | None = None
    # Failed attempts so far (retries with backoff), carried by the re-queued message.
    failures: int = 0
    # Published again by the dispatcher because its worker died or never took it (not by Luigi):
    # a worker answers DONE without running it when its work turns out to be done.
    republished: bool = False
    # The rate-limit slot this task holds (on the limiter's clock): start then, not much later.
    rate_slot: float | None = None
    # When it was published, or when its countdown ends (wall clock, seconds since the
    # epoch): the worker measures its time in the queue from it.
    sent_at: float | None = None
    # The dispatcher that sent it (random, one per `luigi-celery run` process). Once that
    # dispatcher has closed its run, or was interrupted, a worker drops the message unrun.
    session: str | None = None
    # This attempt's random token (a new one each attempt), echoed by every reply to it.
    token: str = field(default_factory=new_token)

    kind = "task"

    @property
    def celery_id(self) -> str:
        return celery_task_id(self.task_id, self.attempt, self.token)

    def to_dict(self) -> dict[str, Any]:
        # (by hand: dataclasses.asdict copies every value deeply, and this is built once a task sent)
        data = {name: getattr(self, name) for name in _TASK_FIELDS}
        data["params"] = dict(self.params)
        return {"v": PROTOCOL_VERSION, "kind": self.kind, **data}

    @classmethod
    def from_dict(cls, data: object) -> TaskMessage:
        data = _check_envelope(data, {cls.kind})
        attempt = _require(data, "attempt", (int,))
        if attempt < 1:
            raise MessageError("field 'attempt' must be at least 1")
        failures = _require(data, "failures", (int,))
        if failures < 0:
            raise MessageError("field 'failures' must be a whole number")
        worker_timeout = _require(data, "worker_timeout", (int, float), nullable=True)
        if worker_timeout is not None and worker_timeout <= 0:
            raise MessageError("field 'worker_timeout' must be positive")
        session = _require(data, "session", (str,), nullable=True)
        if session is not None and not 0 < len(session) <= MAX_SESSION_LENGTH:
            raise MessageError(f"field 'session' must be 1 to {MAX_SESSION_LENGTH} characters")
        token = _require(data, "token", (str,))
        if not _TOKEN.fullmatch(token):
            raise MessageError("field 'token' must be 32 hex digits")
        return cls(
            task_id=_require(data, "task_id", (str,)),
            module=_require(data, "module", (str,)),
            family=_require(data, "family", (str,)),
            params=_str_dict(_require(data, "params", (dict,)), "params"),
            attempt=attempt,
            run_id=_require(data, "run_id", (str,)),
            reply_to=_require(data, "reply_to", (str,)),
            check_unfulfilled_deps=_require(data, "check_unfulfilled_deps", (bool,)),
            check_complete_on_run=_require(data, "check_complete_on_run", (bool,)),
            cache_task_completion=_require(data, "cache_task_completion", (bool,)),
            worker_timeout=worker_timeout,
            failures=failures,
            republished=_require(data, "republished", (bool,)),
            rate_slot=_require(data, "rate_slot", (int, float), nullable=True),
            sent_at=_require(data, "sent_at", (int, float), nullable=True),
            session=session,
            token=token,
        )


_TASK_FIELDS = tuple(f.name for f in fields(TaskMessage))


@dataclass(frozen=True)
class ResultMessage:
    """How one attempt ended, in the terms of Luigi's result tuple."""

    celery_id: str
    task_id: str
    status: str
    expl: str = ""
    missing: list[str] = field(default_factory=list)
    # Dynamic dependencies: [module, family, str params], as Luigi's TaskProcess returns them.
    new_deps: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    event: str | None = None
    host: str = ""

    kind = "result"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["new_deps"] = [list(dep) for dep in self.new_deps]
        return {"v": PROTOCOL_VERSION, "kind": self.kind, **data}

    def luigi_tuple(self) -> tuple[str, str, str, list[str], list[tuple[str, str, dict[str, str]]]]:
        """The tuple Luigi's worker expects on its result queue."""
        return (self.task_id, self.status, self.expl, list(self.missing), list(self.new_deps))

    @classmethod
    def from_dict(cls, data: object) -> ResultMessage:
        data = _check_envelope(data, {cls.kind})
        status = _require(data, "status", (str,))
        if status not in STATUSES:
            raise MessageError(f"unknown status {status!r}")
        event = _require(data, "event", (str,), nullable=True)
        if event is not None and event not in EVENTS:
            raise MessageError(f"unknown event {event!r}")
        missing = _require(data, "missing", (list,))
        if not all(isinstance(m, str) for m in missing):
            raise MessageError("field 'missing' must be a list of strings")
        new_deps = []
        for dep in _require(data, "new_deps", (list,)):
            if not (isinstance(dep, list) and len(dep) == 3 and isinstance(dep[0], str) and isinstance(dep[1], str)):
                raise MessageError("each of 'new_deps' must be [module, family, params]")
            if not isinstance(dep[2], dict):
                raise MessageError("the params of a dynamic dependency must be an object")
            new_deps.append((dep[0], dep[1], _str_dict(dep[2], "new_deps params")))
        return cls(
            celery_id=_require(data, "celery_id", (str,)),
            task_id=_require(data, "task_id", (str,)),
            status=status,
            expl=_require(data, "expl", (str,)),
            missing=list(missing),
            new_deps=new_deps,
            event=event,
            host=_require(data, "host", (str,)),
        )


@dataclass(frozen=True)
class StatusMessage:
    """A status update made inside ``run()``: a message, a percentage, a URL."""

    celery_id: str
    task_id: str
    field: str
    value: Any

    kind = "status"

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: object) -> StatusMessage:
        data = _check_envelope(data, {cls.kind})
        name = _require(data, "field", (str,))
        if name not in STATUS_FIELDS:
            raise MessageError(f"unknown status field {name!r}")
        value = _require(data, "value", STATUS_FIELDS[name])
        if name == "scheduler_message_response":
            _require(value, "message_id", (str,))
            _present(value, "response")
        return cls(
            celery_id=_require(data, "celery_id", (str,)),
            task_id=_require(data, "task_id", (str,)),
            field=name,
            value=value,
        )


@dataclass(frozen=True)
class SchedulerNote:
    """A message from the scheduler to a running task (Luigi's SchedulerMessage), which its
    dispatcher relays to the attempt's inbox (inbox.py)."""

    celery_id: str
    task_id: str
    message_id: str
    content: Any  # what the scheduler was given: text from the visualiser, or any JSON
    payload: dict[str, Any] = field(default_factory=dict)

    kind = "scheduler_message"

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: object) -> SchedulerNote:
        data = _check_envelope(data, {cls.kind})
        payload = _require(data, "payload", (dict,))
        if not all(isinstance(k, str) for k in payload):
            raise MessageError("field 'payload' must have string keys")
        return cls(
            celery_id=_require(data, "celery_id", (str,)),
            task_id=_require(data, "task_id", (str,)),
            message_id=_require(data, "message_id", (str,)),
            content=_present(data, "content"),
            payload=dict(payload),
        )


_REPLY_TYPES: dict[str, Callable[[object], ResultMessage | StatusMessage]] = {
    ResultMessage.kind: ResultMessage.from_dict,
    StatusMessage.kind: StatusMessage.from_dict,
}


def parse_reply(data: object) -> ResultMessage | StatusMessage:
    """Validate a message from the reply queue."""
    kind = data.get("kind") if isinstance(data, Mapping) else None
    parser = _REPLY_TYPES.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise MessageError(f"unknown reply kind {kind!r}")
    return parser(data)
