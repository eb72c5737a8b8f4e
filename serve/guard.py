"""`Guard`, the ASGI middleware in front of the Gateway's routes: it checks the API key and the
request body's size before FastAPI reads or parses anything, so a refused request costs neither
(a body is counted as it arrives, whatever its Content-Length says).

The replicas hold only the key's sha256: the key itself is never in Ray's config, runtime
environment or dashboard. `exposure` refuses an app that would listen beyond loopback with no key.
"""

import hashlib
import hmac
import ipaddress
from typing import Any

from fastapi.responses import JSONResponse

from serve.schemas import error_body

# Holds the API key where the app is built (`build_app` hashes it; the replicas get the hash only).
API_KEY_ENV = "RAYLM_API_KEY"


def api_key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure(host: str | None, key_sha256: str | None, allow_unauthenticated: bool) -> str | None:
    """Why an app on `host` must not start (None when it may): an API with no key on an address
    other machines reach, unless the user said so. `host` None: not known yet (Serve's default,
    loopback)."""
    if key_sha256 or allow_unauthenticated or host is None or is_loopback(host):
        return None
    return (f"the API would listen on {host} with no API key: every client that reaches this address could "
            "use it. Set RAYLM_API_KEY (clients send `Authorization: Bearer $RAYLM_API_KEY`), or say it is "
            "meant to be open with --allow-unauthenticated (args: allow_unauthenticated: true)")


class Guard:
    """ASGI middleware: API key (all routes but /healthz) and request body size (Content-Length
    and the bytes actually received), before FastAPI parses anything."""

    def __init__(self, app: Any, state: Any):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = getattr(self.state, "limits", {})
        headers = dict(scope.get("headers") or [])
        key_hash = limits.get("api_key_sha256")
        if key_hash and not scope["path"].rstrip("/").endswith("/healthz"):
            given = headers.get(b"authorization", b"")
            token = given[len(b"Bearer "):] if given.startswith(b"Bearer ") else None
            if token is None or not hmac.compare_digest(hashlib.sha256(token).hexdigest(), key_hash):
                return await _reply(scope, receive, send, 401, "missing or wrong API key (Authorization: Bearer ...)",
                                    code="invalid_api_key")
        max_body = limits.get("max_body_bytes")
        if not max_body or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _reply(scope, receive, send, 400, "Content-Length is not a number")
        too_big = f"request body is larger than the {max_body}-byte limit"
        if declared > max_body:
            return await _reply(scope, receive, send, 413, too_big, code="body_too_large")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > max_body:
                return await _reply(scope, receive, send, 413, too_big, code="body_too_large")
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(scope, receive, send, status: int, message: str, code: str | None = None) -> None:
    await JSONResponse(error_body(status, message, code=code), status_code=status)(scope, receive, send)
