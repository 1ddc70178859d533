"""kombu's Redis transport, made to survive losing Redis while it holds unacknowledged messages,
and to publish without building a client each time.

With Celery 5.7 and kombu 5.7, a worker that loses its Redis connection while
it holds an unacknowledged message (a running task, or one waiting out its
countdown) closes the broken connection, and closing the channel tries to put
those messages back through a connection kombu has already let go of.
``Channel._connparams`` then reads ``hostname`` from ``None`` and raises
``AttributeError``, which is not among the connection errors Celery ignores
there, so the worker stops with "Unrecoverable error" (the same family as
celery/kombu#582 and #970).

This transport raises kombu's own connection error at that point instead:
Celery ignores it and reconnects.  The messages stay in Redis's set of
unacknowledged messages; the dispatcher re-publishes their tasks when their
run lock or their promised start runs out (and Redis itself would give them
out again after the visibility timeout).

Only for ``redis://``: kombu sets up TLS for ``rediss://`` from the scheme
name, which a transport class of our own would hide.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis client for every publish; building one (its table of
        # response callbacks) cost more than the publish itself. A client is only a handle
        # on the connection pool and is thread-safe, so keep one per pool.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_sync_client")
        if cached is None or cached[0] is not pool:
            cached = self._sync_client = (pool, super()._create_client())
        return cached[1]

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:  # the connection was closed before this channel
            raise redis.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:{Transport.__name__}"
