"""Request logging: one structured (JSON) log line and one metrics count per HTTP request."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.requests import Request

from kvstash.server.metrics import Metrics

log = logging.getLogger("kvstash.server")
LOG_FIELDS = "kvstash.log"  # scope key where handlers leave fields for the request's log line


def log_fields(request: Request, **fields: Any) -> None:
    """Add ``fields`` to the log line of ``request``."""
    request.scope.setdefault(LOG_FIELDS, {}).update(fields)


class RequestLog:
    """ASGI middleware: one JSON log line and one metrics count per HTTP request (after the body is sent,
    so a stream's line carries its token counts)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request(scope["method"], route, status[0])
            line = {"event": "request", "method": scope["method"], "path": scope["path"], "status": status[0]}
            line["duration_s"] = round(time.perf_counter() - t0, 4)
            log.info(json.dumps(line | scope.get(LOG_FIELDS, {})))
