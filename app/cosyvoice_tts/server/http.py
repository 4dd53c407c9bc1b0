"""Plain HTTP on the worker's port (websockets' ``process_request`` hook): /healthz, /readyz, /metrics, and the
checks made before a WebSocket handshake on /ws (path, auth, connection limit)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .auth import check_bearer
from .dashscope import PATHS as DASHSCOPE_PATHS

if TYPE_CHECKING:
    from .app import WorkerServer

log = logging.getLogger("cosyvoice_tts.server")


def _set_header(response: Any, name: str, value: str) -> None:
    try:
        del response.headers[name]
    except KeyError:
        pass
    response.headers[name] = value


class HttpRoutes:
    def __init__(self, server: "WorkerServer") -> None:
        self.server = server

    def _json(self, connection: Any, status: HTTPStatus, body: dict) -> Any:
        resp = connection.respond(status, json.dumps(body) + "\n")
        _set_header(resp, "Content-Type", "application/json")
        return resp

    def process_request(self, connection: Any, request: Any) -> Any:
        srv = self.server
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if srv.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            if not srv.ready:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "loading\n")
            return connection.respond(HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body, content_type = srv.metrics.render()
            resp = connection.respond(HTTPStatus.OK, body.decode("utf-8"))
            _set_header(resp, "Content-Type", content_type)
            return resp
        if path in ("/ws", "/ws/") or path in DASHSCOPE_PATHS:
            if not check_bearer(srv.cfg.auth_token, request.headers.get("Authorization")):
                srv.metrics.errors.labels("unauthorized").inc()
                log.warning("refused /ws from %s: missing or wrong bearer token", _peer(connection))
                resp = self._json(
                    connection, HTTPStatus.UNAUTHORIZED, {"code": "unauthorized", "message": "missing or wrong bearer token"}
                )
                _set_header(resp, "WWW-Authenticate", 'Bearer realm="cosyvoice-tts"')
                return resp
            if not srv.ready and not srv.draining:
                # Refuse the handshake while loading: a load balancer only fails over on an HTTP error, so a
                # restarted card must not take connections it can only answer with not_ready.
                srv.metrics.errors.labels("not_ready").inc()
                resp = self._json(
                    connection, HTTPStatus.SERVICE_UNAVAILABLE,
                    {"code": "not_ready", "message": "the model is still loading; retry shortly"},
                )  # fmt: skip
                _set_header(resp, "Retry-After", "1")
                return resp
            if len(srv.sessions) >= srv.cfg.max_connections:
                srv.metrics.errors.labels("busy").inc()
                return self._json(
                    connection, HTTPStatus.SERVICE_UNAVAILABLE,
                    {"code": "busy", "message": f"at most {srv.cfg.max_connections} connections per worker"},
                )  # fmt: skip
            return None  # go on with the WebSocket handshake
        return connection.respond(
            HTTPStatus.NOT_FOUND, "not found: use /ws, /api-ws/v1/inference, /healthz, /readyz or /metrics\n"
        )


def _peer(connection: Any) -> str:
    try:
        a = connection.remote_address
        return f"{a[0]}:{a[1]}"
    except Exception:  # noqa: BLE001
        return "?"
