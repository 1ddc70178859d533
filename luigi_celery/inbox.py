"""Messages from the scheduler to a running task: Luigi's ``scheduler_messages``, across the broker.

Under Luigi, the scheduler (luigid, with ``[scheduler] send_messages``) hands a message
for a running task to the worker that runs it, at the worker's next ping; the worker puts
it on the task's ``scheduler_messages`` queue, and the task may ``respond()`` to it.

Here the task runs on another machine. The dispatcher (Luigi's worker) publishes the
message to the attempt's own inbox on the broker, a queue named by the attempt's random
token (:func:`post`). Inside ``run()`` the task reads it through :class:`Inbox`, which has
the methods a task reads Luigi's queue with (``empty``, ``get``, ``get_nowait``); a
response travels back as a status reply, and the dispatcher hands it to the scheduler.

As under Luigi, messages are best effort: one sent to an attempt that has ended is
dropped, with its inbox, when the run closes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import luigi
from celery import Celery
from kombu import Queue

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.errors import MessageError
from luigi_celery.results import PUBLISH_RETRY_POLICY, reply_queue

logger = logging.getLogger(__name__)

INBOX_PREFIX = "luigi-celery.inbox."
# A blocking get() looks at the inbox this often.
POLL_INTERVAL = 0.1

Send = Callable[[str, Any], None]  # RemoteStatusReporter.send: a status reply to the dispatcher


def inbox_name(token: str) -> str:
    return INBOX_PREFIX + token


def inbox_queue(name: str) -> Queue:
    """An inbox: declared like a reply queue (an abandoned one leaves RabbitMQ after a day)."""
    return reply_queue(name)


def post(app: Celery, note: m.SchedulerNote, token: str, secret: str | None) -> str:
    """Publish ``note`` to the inbox of the attempt whose token is ``token`` (declaring the inbox);
    return the inbox's name."""
    name = inbox_name(token)
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(
            signing.sign(note.to_dict(), secret),
            exchange="",
            routing_key=name,
            serializer="json",
            declare=[inbox_queue(name)],
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
    return name


def delete(app: Celery, names: Iterable[str]) -> None:
    """Remove the inboxes ``names`` (their run is over), as far as the broker lets us."""
    names = list(names)
    if not names:
        return
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            for name in names:
                inbox_queue(name)(conn.default_channel).delete()
    except Exception as e:
        logger.debug("could not delete %d inbox(es): %s", len(names), e)


class Received:
    """A message from the scheduler, as the task sees it: Luigi's SchedulerMessage."""

    def __init__(self, note: m.SchedulerNote, send: Send) -> None:
        self.content = note.content
        self.payload = note.payload
        self._message_id = note.message_id
        self._send = send

    def __str__(self) -> str:
        return str(self.content)

    def __eq__(self, other: object) -> bool:  # (equal to its content, as Luigi's is)
        return bool(self.content == other)

    def respond(self, response: Any) -> None:
        self._send("scheduler_message_response", {"message_id": self._message_id, "response": response})


class Inbox:
    """The task's ``scheduler_messages``: this attempt's inbox on the broker, read as a queue.

    It connects when the task first looks. A message that is not valid (or not signed with the
    secret, or meant for another attempt) is logged and dropped; a broker that cannot be
    reached for a moment reads as an empty inbox: a lost message must not fail the task.
    """

    def __init__(self, app: Celery, msg: m.TaskMessage, send: Send, secret: str | None) -> None:
        self._app = app
        self._msg = msg
        self._send = send
        self._secret = secret
        self._name = inbox_name(msg.token)
        self._conn: Any = None
        self._queue: Any = None
        self._taken: collections.deque[Received] = collections.deque()

    def empty(self) -> bool:
        if not self._taken:
            self._take()
        return not self._taken

    def get(self, block: bool = True, timeout: float | None = None) -> Received:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._taken and not self._take():
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise queue.Empty
            time.sleep(POLL_INTERVAL if deadline is None else max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))
        return self._taken.popleft()

    def get_nowait(self) -> Received:
        return self.get(block=False)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._queue = None

    def _take(self) -> bool:
        """Move one valid message from the inbox to the ones taken; False when none waits."""
        while True:
            try:
                message = self._bound().get(no_ack=True, accept=["json"])
            except Exception as e:
                logger.warning("could not read the scheduler messages of %s: %s", self._msg.task_id, e)
                self.close()
                return False
            if message is None:
                return False
            note = self._read(message)
            if note is not None:
                self._taken.append(Received(note, self._send))
                return True

    def _bound(self) -> Any:
        if self._queue is None:
            self._conn = self._app.connection_for_read()
            self._queue = inbox_queue(self._name)(self._conn.default_channel)
            self._queue.declare()
        return self._queue

    def _read(self, message: Any) -> m.SchedulerNote | None:
        size = len(message.body or b"")
        try:
            if size > m.MAX_MESSAGE_BYTES:
                raise MessageError(f"{size} bytes (at most {m.MAX_MESSAGE_BYTES})")
            data = message.decode()
            signing.verify(data, self._secret)
            note = m.SchedulerNote.from_dict(data)
            if note.celery_id != self._msg.celery_id:
                raise MessageError(f"it is for {note.celery_id[:200]}")
        except Exception as e:
            logger.error("dropped a scheduler message on %s: %s", self._name, e)
            return None
        return note


@contextlib.contextmanager
def inbox_for(
    app: Celery, task: luigi.Task, msg: m.TaskMessage, send: Send, secret: str | None
) -> Iterator[Inbox | None]:
    """The inbox of ``task``'s attempt while it runs, when the task accepts messages (else None)."""
    if not task.accepts_messages:
        yield None
        return
    inbox = Inbox(app, msg, send, secret)
    try:
        yield inbox
    finally:
        inbox.close()
