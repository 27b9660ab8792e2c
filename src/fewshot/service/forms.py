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
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile
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
        charset = self._charset or "utf-8"
        try:
            text = bytes(part.data).decode(charset)
        except (UnicodeDecodeError, LookupError) as exc:
            where = f" (byte 0x{part.data[exc.start]:02x} at offset {exc.start})" if isinstance(
                exc, UnicodeDecodeError) else ""
            raise _FieldError(400, "invalid_utf8", f"form field {part.field_name[:40]!r} is not valid "
                              f"{charset.upper()}{where}; send text fields as UTF-8") from None
        self.items.append((part.field_name, text))


class ServiceRequest(Request):
    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = StrictMultiPartParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                                   max_part_size=max_part_size)
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
