"""The recogniser core's request errors: what a request asked that cannot be done, by kind.

Each carries a stable machine-readable `code` and a message naming the bad value and the fix; none
carries an HTTP status. The HTTP layer maps the kinds to status codes in one place
(`fewshot.service.http.errors`), with the store's `NotFoundError` / `ConflictError` /
`StoreUnavailable` and the cost bounds' `ServiceBusy` / `OverBudget`.
"""

from __future__ import annotations

from fewshot.errors import FewshotError


class RequestError(FewshotError):
    """The request is invalid as asked (a label, a threshold, a setting, top_k): refused, nothing applied."""

    default_code = "invalid_argument"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code


class TooLarge(RequestError):
    """The request asks for more than a limit allows (an image's pixels or decoding work)."""

    default_code = "too_large"


class UnsupportedMedia(RequestError):
    """An upload in a format the service does not decode."""

    default_code = "unsupported_media_type"


class Unprocessable(RequestError):
    """Well-formed, but the model cannot use it (images it embeds to NaN or infinity)."""

    default_code = "unprocessable"
