"""Request limits before any route runs: body size (413), and what an upload's bytes are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

# Magic numbers of the formats ctscan decodes (transforms.DECODE_FORMATS, and DICOM).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The format an upload's first bytes announce (PNG, JPEG, BMP, TIFF, WEBP, DICOM) or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[128:132] == b"DICM":
        return "DICOM"
    return None


FIX = (
    "send a smaller file or fewer files (the server's serve.max_upload_bytes and "
    "serve.max_batch_files)."
)


def too_large(limit: int, reason: str) -> str:
    """The message of a body refused at `limit` bytes; `reason` says which settings make it."""
    return f"the request body is larger than {limit} bytes ({reason})."


class BodyTooLarge(HTTPException):
    """A body that grew past its limit while streaming in (no Content-Length to refuse early)."""

    def __init__(self, limit: int, reason: str) -> None:
        super().__init__(status_code=413, detail=too_large(limit, reason))


class BodyLimit:
    """ASGI middleware: refuse bodies above a limit per path prefix with 413, before reading them.

    A declared Content-Length above the limit is refused at once, a streamed body cut off when it
    passes it; each limit carries the settings that make it, for the message."""

    def __init__(
        self,
        app: Any,
        *,
        default: tuple[int, str],
        larger: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.default = default
        self.larger = larger or {}

    def limit(self, path: str) -> tuple[int, str]:
        """The body limit for a request path, and its reason."""
        for prefix, limit in self.larger.items():
            if path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, reason = self.limit(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, limit, reason)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, reason)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(
        self, scope: dict, receive: Callable, send: Callable, limit: int, reason: str
    ):
        error = {"error": too_large(limit, reason), "fix": FIX}
        await JSONResponse(error, status_code=413, headers={"connection": "close"})(
            scope, receive, send
        )
