"""Optional shared-secret auth: `Authorization: Bearer <token>` on the WebSocket handshake."""

from __future__ import annotations

import hmac


def bearer_token(header_value: str | None) -> str | None:
    """The token of an ``Authorization`` header value (scheme case-insensitive, as older SDKs send
    ``bearer``), or None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def check_bearer(expected: str | None, header_value: str | None) -> bool:
    """True when no token is configured or the header carries exactly the expected token."""
    if not expected:
        return True
    got = bearer_token(header_value)
    if got is None:
        return False
    return hmac.compare_digest(got.encode("utf-8"), expected.encode("utf-8"))
