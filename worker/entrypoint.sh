#!/bin/sh
# Entry point of the worker image: run the command given (by default the worker).
#
# For `luigi-celery worker`, Celery options come from the environment when set:
#   WORKER_CONCURRENCY            --concurrency N   (pool processes; about one per core)
#   WORKER_AUTOSCALE              --autoscale MAX,MIN
#   WORKER_QUEUES                 -Q a,b            (default: LUIGI_CELERY_QUEUE, else "luigi")
#   WORKER_MAX_TASKS_PER_CHILD    --max-tasks-per-child N
# Options on the command line come after these, so they win.
set -eu

if [ "$#" -ge 2 ] && [ "$1" = "luigi-celery" ] && [ "$2" = "worker" ]; then
    shift 2
    set -- luigi-celery worker \
        ${WORKER_CONCURRENCY:+--concurrency "$WORKER_CONCURRENCY"} \
        ${WORKER_AUTOSCALE:+--autoscale "$WORKER_AUTOSCALE"} \
        ${WORKER_QUEUES:+-Q "$WORKER_QUEUES"} \
        ${WORKER_MAX_TASKS_PER_CHILD:+--max-tasks-per-child "$WORKER_MAX_TASKS_PER_CHILD"} \
        "$@"
fi
# exec: the command replaces this shell, so the stop signal reaches it directly.
exec "$@"
