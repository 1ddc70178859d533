"""Build the Celery app luigi-celery runs on.

There is no hidden global app: the CLI builds one from its settings and
passes it around.  For ``celery -A luigi_celery.app worker`` (and Flower),
the module attribute ``app`` is built from the environment the first time
someone asks for it, never at import.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP

from luigi_celery.brokers import check_broker_url, is_rabbitmq, is_redis, kombu_broker, redis_store_url
from luigi_celery.execute import register_execute
from luigi_celery.guard import OnlyExecute, RestrictControl, refuse_compressed_messages
from luigi_celery.metrics import WorkerMetrics
from luigi_celery.ratelimit import FileLimiter, Limiter, RedisLimiter
from luigi_celery.results import ReplyQueueCheck
from luigi_celery.settings import EMBEDDED_POLLING_INTERVAL, Settings, load_settings
from luigi_celery.store_redis import RedisStore

# Celery's own queue priority range, used on RabbitMQ (x-max-priority).
MAX_PRIORITY = 10


def embedded_transport_options(folder: str) -> dict[str, Any]:
    """kombu filesystem transport options for an embedded broker in ``folder``."""
    messages = os.path.join(folder, "messages")
    processed = os.path.join(folder, "processed")
    for path in (messages, processed):
        os.makedirs(path, exist_ok=True)
    return {
        "data_folder_in": messages,
        "data_folder_out": messages,
        "processed_folder": processed,
        "control_folder": os.path.join(folder, "control"),
        "polling_interval": EMBEDDED_POLLING_INTERVAL,
    }


def store_url(settings: Settings) -> str | None:
    """The coordination store's URL: none embedded; else ``redis_url``, or the broker if it is Redis."""
    return None if settings.embedded else redis_store_url(settings.broker_url, settings.redis_url)


def make_limiter(settings: Settings) -> Limiter | None:
    """The rate limiter the dispatcher and its workers share, or None when they share none
    (RabbitMQ with no Redis store: each dispatcher then paces only its own tasks)."""
    if settings.embedded:
        assert settings.embedded_dir is not None
        return FileLimiter(os.path.join(settings.embedded_dir, "ratelimits"))
    url = store_url(settings)
    return RedisLimiter(url) if url else None


class _AMQP(AMQP):
    """Celery's message builder, with each ``task-sent`` event named like its task.

    Celery names the sent event after the registered task (``luigi_celery.execute``)
    even when the message has a shadow name (the Luigi task id).  Flower takes
    the name of the last event it applies, and the dispatcher's sent event can
    arrive after the worker's, so without this a task could show the generic name.
    """

    def as_task_v2(self, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(*args, **kwargs)
        shadow = message.headers.get("shadow")
        if message.sent_event is not None and shadow:
            message.sent_event["name"] = shadow
        return message


def make_app(settings: Settings, worker_metrics: WorkerMetrics | None = None) -> Celery:
    """A Celery app for ``settings``, with the execute task registered.

    For the embedded default, ``settings.embedded_dir`` must name the folder
    the broker lives in (the dispatcher creates it).
    """
    redis_broker = is_redis(settings.broker_url)
    transport_options: dict[str, Any] = {}
    if settings.embedded:
        if not settings.embedded_dir:
            raise ValueError("the embedded broker needs settings.embedded_dir")
        transport_options = embedded_transport_options(settings.embedded_dir)
    elif settings.broker_url:
        check_broker_url(settings.broker_url)
    if redis_broker:
        transport_options["visibility_timeout"] = settings.visibility_timeout
    transport_options.update(settings.broker_transport_options)
    broker_url, transport = kombu_broker(settings.broker_url)

    # Anyone who can publish on the broker can send a worker (or the dispatcher's reply
    # queue) a message: the app runs luigi-celery's task alone, from uncompressed JSON
    # messages, and answers a few remote-control commands (guard.py).
    refuse_compressed_messages()
    app = Celery("luigi_celery", set_as_current=False, amqp=_AMQP, tasks=OnlyExecute())
    app.steps["consumer"].add(RestrictControl)
    app.conf.update(
        broker_url=broker_url,
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=settings.result_backend,
        task_ignore_result=settings.result_backend is None,
        # JSON only, both ways: a pickle on the queue is refused before it is decoded.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_queue_max_priority=MAX_PRIORITY,
        # At-least-once: acknowledge after the task ran; one message per process at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis: fetch a message only when a process is free to run it, so a worker
        # that dies holds as few not-yet-started messages as possible.
        worker_disable_prefetch=redis_broker,
        # Task events cost a worker about 40% of its throughput (benchmarks/): off until Flower
        # asks for them (it broadcasts enable_events every 5 s, `luigi-celery flower` at once);
        # `luigi-celery worker -E` sends them from the start. The dispatcher's task-sent events
        # go out in batches (sent_events.py).
        worker_send_task_events=False,
        task_send_sent_event=True,
        # The include list is imported before the pool forks.
        include=list(settings.task_modules),
    )
    url = store_url(settings)
    # With no store (RabbitMQ alone), a dispatcher's deleted reply queue says its run is over.
    rabbitmq = is_rabbitmq(settings.broker_url)
    register_execute(
        app,
        settings.task_modules,
        RedisStore(url) if url else None,
        settings.lock_ttl,
        make_limiter(settings),
        worker_metrics,
        run_over=ReplyQueueCheck(app) if rabbitmq and not url else None,
        secret=settings.secret,
    )
    return app


def __getattr__(name: str) -> Any:
    # `celery -A luigi_celery.app`: build the module-level app from the environment, once.
    if name == "app":
        settings = load_settings()
        if settings.embedded:
            raise RuntimeError("set LUIGI_CELERY_BROKER_URL to use luigi_celery.app with the celery command")
        built = make_app(settings)
        globals()["app"] = built
        return built
    raise AttributeError(name)
