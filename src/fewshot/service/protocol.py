"""Slow clients: a deadline for reading each request.

uvicorn times out idle keep-alive connections only: a client that opens a connection and sends its
headers or body a byte at a time holds the connection (and, once the headers are in, a request
task) for as long as it likes; a few hundred such clients exhaust the server. The protocols here
give every request `read_timeout_s` seconds from its first byte (or from the connection's opening)
to arrive in full, headers and body; past it the client gets `408 request_timeout` and the
connection is closed. The time the service takes to answer is not counted.

Two parsers, one deadline (`ReadDeadline`): `DeadlineHttpToolsProtocol` on uvicorn's httptools
protocol (the C parser, llhttp: what `fewshot serve` runs, `serving_protocol()`) and
`DeadlineH11Protocol` on its pure-Python h11 protocol (for a deployment that wants h11). `fewshot serve` sets the deadline from
`FEWSHOT_REQUEST_READ_TIMEOUT_S` (default 30 s: a 16 MiB upload then needs about 4.5 Mbit/s).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fewshot.service.middleware import error_body

DEFAULT_READ_TIMEOUT_S = 30.0
_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # the client's side of the request is complete


class ReadDeadline(asyncio.Protocol):
    """The deadline, for a uvicorn HTTP protocol class that it is mixed into (before it). Class
    attribute `read_timeout_s`; for several workers each worker reads it from
    FEWSHOT_REQUEST_READ_TIMEOUT_S."""

    read_timeout_s: float = float(os.environ.get("FEWSHOT_REQUEST_READ_TIMEOUT_S") or DEFAULT_READ_TIMEOUT_S)
    _read_deadline: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a whole request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_expired)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

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


class DeadlineH11Protocol(ReadDeadline, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the per-request read deadline."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _RECEIVED:
            self._disarm()  # headers and body are in


class DeadlineHttpToolsProtocol(ReadDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C) with the per-request read deadline."""

    def on_message_complete(self) -> None:
        self._disarm()  # headers and body are in
        super().on_message_complete()


def serving_protocol() -> type[ReadDeadline]:
    """The protocol `fewshot serve` runs: httptools' (about a third less CPU per small request than
    h11's, `benchmarks/bench_service.py --throughput`)."""
    return DeadlineHttpToolsProtocol
