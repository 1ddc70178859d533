"""A pytest plugin for Luigi's own tests: ``Task.get_params`` remembered, as in a dispatcher (params.py)."""

from luigi_celery import params

params.install()
