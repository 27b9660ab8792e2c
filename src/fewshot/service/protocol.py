"""Slow clients: a deadline for reading each request.

uvicorn times out idle keep-alive connections only: a client that opens a connection and sends its
headers or body a byte at a time holds the connection (and, once the headers are in, a request
task) for as long as it likes; a few hundred such clients exhaust the server. `DeadlineH11Protocol`
gives every request `read_timeout_s` seconds from its first byte (or from the connection's opening)
to arrive in full, headers and body; past it the client gets `408 request_timeout` and the
connection is closed. The time the service takes to answer is not counted.

`fewshot serve` runs uvicorn with this protocol (`FEWSHOT_REQUEST_READ_TIMEOUT_S`, default 30 s:
a 16 MiB upload then needs about 4.5 Mbit/s).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fewshot.service.middleware import error_body

DEFAULT_READ_TIMEOUT_S = 30.0
_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # the client's side of the request is complete


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-request read deadline (class attribute `read_timeout_s`; for
    several workers it is read from FEWSHOT_REQUEST_READ_TIMEOUT_S in each worker)."""

    read_timeout_s: float = float(os.environ.get("FEWSHOT_REQUEST_READ_TIMEOUT_S") or DEFAULT_READ_TIMEOUT_S)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_expired)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a whole request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in _RECEIVED:
            self._disarm()

    def _read_expired(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            body = error_body("request_timeout", f"the request did not arrive within {self.read_timeout_s:g} s; "
                              "send it at once (or on a faster connection)")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()  # the request's task, if any, sees a disconnect
