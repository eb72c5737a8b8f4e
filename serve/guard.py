"""`Guard`, the ASGI middleware in front of the Gateway's routes: it checks the API key and the
request body's size before FastAPI reads or parses anything, so a refused request costs neither
(a body is counted as it arrives, whatever its Content-Length says).
"""

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from serve.schemas import error_body

# Holds the API key: `build_app` forwards it to the ingress replicas, whose Gateway hands it to the Guard.
API_KEY_ENV = "RAYLM_API_KEY"


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
        key = limits.get("api_key")
        if key and not scope["path"].rstrip("/").endswith("/healthz"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
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
