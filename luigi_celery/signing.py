"""Signing messages with a shared secret (``LUIGI_CELERY_SECRET``).

With a secret set, every task message and reply carries an HMAC-SHA256 of its
content (its JSON, keys sorted) in the field :data:`SIGNATURE`; the other side
refuses what does not verify. Without one, both functions pass everything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from luigi_celery.errors import MessageError

# The field of a message or reply that holds its HMAC, when a secret is set.
SIGNATURE = "sig"


def _signed_text(payload: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in payload.items() if k != SIGNATURE}, sort_keys=True,
                      separators=(",", ":")).encode()  # fmt: skip


def sign(payload: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """``payload`` with its HMAC-SHA256 under ``secret`` (unchanged without a secret)."""
    if not secret:
        return payload
    digest = hmac.new(secret.encode(), _signed_text(payload), hashlib.sha256).hexdigest()
    return {**payload, SIGNATURE: digest}


def verify(payload: object, secret: str | None) -> None:
    """Raise :class:`MessageError` unless ``payload`` carries a valid HMAC under ``secret``
    (without a secret, everything passes)."""
    if not secret:
        return
    if not isinstance(payload, Mapping) or not isinstance(payload.get(SIGNATURE), str):
        raise MessageError("unsigned message (a secret is set: every message must be signed with it)")
    expected = hmac.new(secret.encode(), _signed_text(payload), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, payload[SIGNATURE]):
        raise MessageError("bad signature (signed with another secret, or changed on the way)")
