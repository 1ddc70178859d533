"""Keeping passwords out of everything luigi-celery prints or logs.

:func:`redact` hides the passwords of a URL (or a ``;``-separated failover
list) that luigi-celery itself shows.  :func:`scrub` cleans text luigi-celery
did not write, such as an error message from kombu, redis-py or amqp that may
quote the URL it was given, or a piece of it: kombu takes ``redis://:pa/ss@host``
apart at the ``/``, and then reports ``'pa'`` as a port that is not a number.

A password is everything between the ``:`` after the user and the *last* ``@``
of the URL, so an ``@``, ``/``, ``?`` or ``;`` in it is hidden with the rest.
Where that is ambiguous (an ``@`` in the query of a URL that has no password),
more is hidden than needs to be, never less.  Both functions only move
strings about: they never raise, whatever the text.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

MASK = "****"
# Free text may quote pieces of a password (see the module docstring); pieces at least this
# long are scrubbed too. Shorter ones stay: they would take letters out of every other word.
MIN_SCRUBBED = 3

_SCHEME = re.compile(r"[A-Za-z][\w+.-]*://")
# Failover lists separate their URLs with ';': only where the next URL starts, so that a ';'
# inside a password does not split it.
_NEXT_URL = re.compile(r"(;\s*)(?=[A-Za-z][\w+.-]*://)")
# Query parameters that carry a secret (?password=..., &sentinel_password=..., &token=...).
_SECRET_PARAMETER = re.compile(r"(?P<key>[?&;][\w.-]*(?:password|passwd|secret|token)[\w.-]*=)(?P<value>[^&#]*)", re.I)
# A URL quoted in free text: up to a space or a quote, and not the punctuation that follows it.
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>]*[^\s'\"<>:.,;)]")
# What breaks a URL into pieces, and so a password written into one without percent-encoding.
_DELIMITERS = re.compile(r"[/@:?#;&=\[\]]")
# These end the user:password part of a URL unless percent-encoded (';' separates kombu's failover URLs).
_MUST_BE_ENCODED = "/?#@;"


def _urls(text: str) -> list[str]:
    """The URLs of a failover list (a single URL: itself), and between them their separators."""
    return _NEXT_URL.split(text)


def _credentials(url: str) -> tuple[int, int] | None:
    """Where the password of ``url`` starts and ends, or None when it has none."""
    scheme = _SCHEME.match(url.lstrip())
    if scheme is None:
        return None
    start = len(url) - len(url.lstrip()) + scheme.end()
    at = url.rfind("@", start)
    colon = url.find(":", start, at)
    if at < 0 or colon < 0:
        return None  # no credentials, or a user alone
    return colon + 1, at


def _redact_one(url: str) -> str:
    where = _credentials(url)
    if where is not None:
        url = url[: where[0]] + MASK + url[where[1] :]
    return _SECRET_PARAMETER.sub(lambda m: m["key"] + MASK, url)


def redact(url: str | None) -> str:
    """Return ``url`` with every password hidden, for logs and error messages.

    Works on a ``;``-separated failover list, on ``?password=`` and other secret
    query parameters, and on URLs kombu's parser rejects (a bad port, a Sentinel
    list, a password that should have been percent-encoded): an error message
    about a bad URL must never crash, nor show the password.
    """
    if not url:
        return "<none>"
    parts = _urls(str(url))
    return "".join(part if i % 2 else _redact_one(part) for i, part in enumerate(parts))


def passwords_in(url: str | None) -> list[str]:
    """The passwords a URL (or a failover list) holds, in the user part or in the query."""
    found: list[str] = []
    for part in _urls(url or "")[::2]:
        where = _credentials(part)
        if where is not None and where[1] > where[0]:
            found.append(part[where[0] : where[1]])
        found += [m["value"] for m in _SECRET_PARAMETER.finditer(part) if m["value"]]
    return found


def needs_encoding(url: str | None) -> bool:
    """True when a password in ``url`` holds a character that must be percent-encoded
    (``/ ? # @ ;``): kombu and redis-py then read a piece of it as the host or the port."""
    return any(c in password for password in passwords_in(url) for c in _MUST_BE_ENCODED)


ENCODING_HINT = (
    "a password in a URL must be percent-encoded ('/' as %2F, '@' as %40, '?' as %3F, '#' as %23, ';' as %3B)"
)


def _forms(secret: str) -> set[str]:
    """``secret`` as it may appear in a message: as given, decoded, encoded, and its pieces."""
    forms = {secret, urllib.parse.unquote(secret), urllib.parse.quote(secret, safe="")}
    for form in list(forms):
        forms.update(_DELIMITERS.split(form))
    return {form for form in forms if len(form) >= MIN_SCRUBBED}


def scrub(text: str, urls: Iterable[str | None] = (), secrets: Iterable[str | None] = ()) -> str:
    """``text`` without the passwords of ``urls``, the ``secrets``, or any password of a URL quoted in it.

    For text luigi-celery did not write: a library's error message may quote the
    URL it was given, a decoded password, or a piece of one (kombu's "Port could
    not be cast to integer value as 'pa'"); every form and every piece of
    :data:`MIN_SCRUBBED` characters or more becomes ``****``, where it stands apart
    (a piece ``word`` of a password ``pass/word`` leaves the word "password" alone).
    """
    known: set[str] = set()
    for url in urls:
        for password in passwords_in(url):
            known |= _forms(password)
    for secret in secrets:
        if secret:
            known |= _forms(secret)
    text = str(text)
    for secret in sorted(known, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    return _URL_IN_TEXT.sub(lambda m: redact(m[0]), text)
