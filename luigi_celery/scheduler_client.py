"""Luigi's ``RemoteScheduler``, over one scheduler's several replicas.

``luigi-celery run --scheduler-url http://a:8082,http://b:8082`` names the
replicas of a ``luigi-celery scheduler``. A call goes to the replica that
answered last; when that one does not answer, or answers 503 (it is a
standby), the call goes to the next, with exponential backoff and jitter
between tries, for as long as Luigi's own RPC retries would have tried
(``[core] rpc-retry-attempts`` x ``rpc-retry-wait``, 90 s by default). A
single URL (a Kubernetes Service in front of the replicas) gets the same
backoff. A 4xx answer is the call's fault, not the server's: no retry.

Calls go over one kept-alive ``http.client`` connection per replica
(:class:`KeepAliveFetcher`) rather than through ``requests``, which builds a
whole session request (proxies from the environment, hooks, cookies) for each
call: on a central scheduler that was 60% of the dispatcher's CPU.

This overrides ``RemoteScheduler._fetch``, which is private to Luigi;
``tests/test_luigi_contract.py`` pins what it reads.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import threading
import urllib.parse
from typing import Any

import luigi.rpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from luigi_celery.errors import ConfigError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1  # seconds
BACKOFF_MAX = 5.0


def scheduler_urls(text: str) -> list[str]:
    """``URL1,URL2,...`` as a list, each without its trailing slash."""
    urls = [url.strip().rstrip("/") for url in text.split(",") if url.strip()]
    if not urls:
        raise ConfigError("--scheduler-url names no URL")
    return urls


class FailoverScheduler(luigi.rpc.RemoteScheduler):
    """A RemoteScheduler that moves on to the next replica (see the module)."""

    def __init__(self, urls: list[str], connect_timeout: float | None = None) -> None:
        super().__init__(urls[0], connect_timeout)
        self._urls = urls
        self._current = 0
        if all(url.startswith(("http://", "https://")) for url in urls):  # (else Luigi's, for http+unix)
            self._fetcher = KeepAliveFetcher()

    def _fetch(self, url_suffix: str, body: dict[str, Any]) -> str:
        budget = max(1, self._rpc_retry_attempts) * max(1, self._rpc_retry_wait)
        retrying = Retrying(
            wait=wait_exponential_jitter(initial=BACKOFF_FIRST, max=BACKOFF_MAX),
            stop=stop_after_delay(budget),
            retry=retry_if_exception(self._worth_retrying),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._fetch_from_current(url_suffix, body)
        except self._fetcher.raises as e:
            raise luigi.rpc.RPCError(
                f"scheduler call {url_suffix} failed, tried {', '.join(self._urls)} for up to {budget} s: {e}", e
            ) from e
        raise AssertionError("unreachable")  # (Retrying either returns or raises)

    def _fetch_from_current(self, url_suffix: str, body: dict[str, Any]) -> str:
        url = self._urls[self._current]
        try:
            page: str = self._fetcher.fetch(luigi.rpc._urljoin(url, url_suffix), body, self._connect_timeout)
            return page
        except self._fetcher.raises as e:
            if self._worth_retrying(e) and len(self._urls) > 1:
                self._current = (self._current + 1) % len(self._urls)
                self._url = self._urls[self._current]
                # a standby's 503 is the replicas working as meant; anything else is worth a line
                level = logging.DEBUG if _status(e) == 503 else logging.WARNING
                log.log(level, "the scheduler at %s did not serve (%s): trying %s", url, _why(e), self._url)
            raise

    def _worth_retrying(self, error: BaseException) -> bool:
        """Not answering, or 5xx (503: a standby): yes. A 4xx: the call is wrong, no."""
        status = _status(error)
        return isinstance(error, self._fetcher.raises) and not (status is not None and 400 <= status < 500)


def _status(error: BaseException) -> int | None:
    status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "code", None)
    return status if isinstance(status, int) else None


def _why(error: BaseException) -> str:
    status = _status(error)
    return f"HTTP {status}" if status else type(error).__name__


class SchedulerHTTPError(OSError):
    """The scheduler answered with an HTTP error status (``code``)."""

    def __init__(self, code: int, url: str) -> None:
        super().__init__(f"HTTP {code} from {url}")
        self.code = code


class KeepAliveFetcher:
    """Luigi's fetcher interface (``fetch``, ``raises``, ``close``) on one kept-alive
    connection per scheduler replica and thread (Luigi's keep-alive thread pings while the
    worker's loop calls: an ``http.client`` connection serves one request at a time)."""

    raises = (OSError, http.client.HTTPException)

    def __init__(self) -> None:
        self._local = threading.local()
        self._pid = os.getpid()

    @property
    def _connections(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        if os.getpid() != self._pid:  # (a forked child makes connections of its own)
            self._local, self._pid = threading.local(), os.getpid()
        connections: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(self._local, "map", None)
        if connections is None:
            connections = self._local.map = {}
        return connections

    def fetch(self, full_url: str, body: dict[str, Any], timeout: float) -> str:
        parts = urllib.parse.urlsplit(full_url)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if parts.username is not None:  # as Luigi's URLLibFetcher: http://user:password@host
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        data = urllib.parse.urlencode(body).encode()
        key = (parts.scheme, parts.netloc)
        reused = key in self._connections
        try:
            status, page = self._post(key, parts, timeout, path, data, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            # the server closed the idle connection before this request: it did not see it
            status, page = self._post(key, parts, timeout, path, data, headers)
        if status >= 400:
            raise SchedulerHTTPError(status, full_url)
        return page

    def _post(self, key: tuple[str, str], parts: urllib.parse.SplitResult, timeout: float, path: str,
              data: bytes, headers: dict[str, str]) -> tuple[int, str]:  # fmt: skip
        connections = self._connections
        connection = connections.get(key)
        if connection is None:
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connection = connections[key] = kind(parts.hostname or "", parts.port, timeout=timeout)
        try:
            connection.request("POST", path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8")
        except BaseException:
            connection.close()
            del connections[key]
            raise

    def close(self) -> None:
        """Close this thread's connections (the others' close with their threads)."""
        connections = self._connections
        for connection in connections.values():
            connection.close()
        connections.clear()
