"""Multipart form parsing for the service: Starlette's parser, stricter.

* A text field that is not valid in its charset (UTF-8 unless the request names another) is refused
  with 400 `invalid_utf8` naming the field and the byte; Starlette would decode it as Latin-1 and
  store mojibake.
* A text field sent more than once (two `label` fields) is refused with 400 `duplicate_field`;
  FastAPI would silently keep the last.
* More files than the form limit is 413 `too_many_images` (as is 65..N files in `_decode_all`);
  Starlette answers 400.
* python-multipart logs malformed bodies at WARNING; with no handler configured that reaches
  stderr through logging's last resort. They are the client's error, answered 400: not logged.

Installed as the app's route class (`ServiceRoute`), FastAPI's documented way to customise the
request; `ServiceRequest._get_form` replaces Starlette's form parsing for multipart bodies.

A small body in the plain shape every HTTP client sends (at most `FAST_FORM_BYTES`, CRLF line
ends, parts of at most 4 headers, UTF-8 names, no charset parameter, within the limits) is split
with a few `bytes.find` calls (`plain_multipart`) instead of python-multipart's state machine, its
callbacks and a temporary file per part: a third of the event loop's time per one-image classify
(issue 16's throughput). Anything else, and anything the fast path is unsure of, goes through the
full parser, which decides and words every refusal; a test checks both give the same form on
generated and mutated bodies.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from tempfile import SpooledTemporaryFile
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import parse_options_header

logging.getLogger("python_multipart").setLevel(logging.CRITICAL)  # client errors, answered 400
logging.getLogger("multipart").setLevel(logging.CRITICAL)  # the package's old name


class FormError(HTTPException):
    """A refused form, with the service's error code (FastAPI passes HTTPException through as is)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


class _FieldError(MultiPartException):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        self.items.append((part.field_name, _text(bytes(part.data), part.field_name, self._charset or "utf-8")))


FAST_FORM_BYTES = 256 * 1024  # bodies up to this size may take the plain-shape path (held in memory)
_HEADER_LINE = re.compile(rb"([A-Za-z0-9-]{1,64}): *([^\r\n]{0,1024})")


def _text(data: bytes, name: str, charset: str) -> str:
    """A text field's value, decoded strictly (the one rule for both paths)."""
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError) as exc:
        where = f" (byte 0x{data[exc.start]:02x} at offset {exc.start})" if isinstance(exc, UnicodeDecodeError) else ""
        raise _FieldError(400, "invalid_utf8", f"form field {name[:40]!r} is not valid {charset.upper()}{where}; "
                          "send text fields as UTF-8") from None


def _plain_part(part: bytes) -> tuple[str, str | None, list[tuple[bytes, bytes]], bytes] | None:
    """One part after its boundary line: (name, filename or None, headers, data), or None when it
    is not in the plain shape."""
    end = part.find(b"\r\n\r\n")
    if not part.startswith(b"\r\n") or end < 2:
        return None
    lines = part[2:end].split(b"\r\n")
    if len(lines) > 4:
        return None
    headers = []
    for line in lines:
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            return None
        headers.append((m[1].lower(), m[2]))
    dispositions = [v for k, v in headers if k == b"content-disposition"]
    if len(dispositions) != 1:
        return None
    _, options = parse_options_header(dispositions[0])
    try:
        name = options[b"name"].decode("utf-8")
        filename = options[b"filename"].decode("utf-8") if b"filename" in options else None
    except (KeyError, UnicodeDecodeError):
        return None
    return name, filename, headers, part[end + 4:]


def plain_multipart(body: bytes, content_type: str, *, max_files: int | float, max_fields: int | float,
                    max_part_size: int) -> FormData | None:
    """The form of a multipart body in the plain shape (see the module's docstring), or None: then
    the full parser reads it. Raises `_FieldError` for a text field that is not valid UTF-8."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if b"charset" in params or not 0 < len(boundary) <= 70 or not body.startswith(b"--" + boundary + b"\r\n"):
        return None
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if pieces[0] or pieces[-1] not in (b"--", b"--\r\n") or len(pieces) < 3:
        return None
    parts = [_plain_part(p) for p in pieces[1:-1]]
    files = sum(1 for p in parts if p is not None and p[1] is not None)
    if any(p is None for p in parts) or files > max_files or len(parts) - files > max_fields:
        return None
    items: list[tuple[str, str | UploadFile]] = []
    for name, filename, headers, data in parts:  # type: ignore[misc]
        if filename is None:
            if len(data) > max_part_size:
                return None
            items.append((name, _text(data, name, "utf-8")))
            continue
        # in memory like the full parser's parts (UploadFile then closes it without a thread hand-off);
        # FormData.close() closes it
        spool: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(max_size=MultiPartParser.spool_max_size)  # noqa: SIM115
        spool.write(data)
        spool.seek(0)
        items.append((name, UploadFile(file=spool, size=len(data), filename=filename,  # type: ignore[arg-type]
                                       headers=Headers(raw=headers))))
    return FormData(items)


class ServiceRequest(Request):
    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            length = self.headers.get("content-length", "")
            try:
                form = None
                if length.isdigit() and int(length) <= FAST_FORM_BYTES:
                    form = plain_multipart(await self.body(), self.headers["content-type"], max_files=max_files,
                                           max_fields=max_fields, max_part_size=max_part_size)
                if form is None:  # the full parser (it reads the body kept by `body()`, if read)
                    async with aclosing(self.stream()) as stream:
                        parser = StrictMultiPartParser(self.headers, stream, max_files=max_files,
                                                       max_fields=max_fields, max_part_size=max_part_size)
                        form = await parser.parse()
            except _FieldError as exc:
                raise FormError(exc.status, exc.code, exc.message) from None
            except MultiPartException as exc:
                if exc.message.startswith("Too many files"):
                    raise FormError(413, "too_many_images", f"more than {int(max_files)} files in one request "
                                      f"exceed the limit of {int(max_files)} images per request; split the "
                                      "upload") from None
                raise FormError(400, "bad_request", exc.message) from None
            counts = Counter(k for k, v in form.multi_items() if not isinstance(v, UploadFile))
            repeated = sorted(k for k, n in counts.items() if n > 1)
            if repeated:
                await form.close()
                raise FormError(400, "duplicate_field", f"form field {repeated[0][:40]!r} is given "
                                  f"{counts[repeated[0]]} times; send it once")
            self._form = form
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class ServiceRoute(APIRoute):
    """Every route parses its forms with `ServiceRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_forms(request: Request) -> Response:
            return await handler(ServiceRequest(request.scope, request.receive))

        return strict_forms
