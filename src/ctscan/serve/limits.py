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
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[128:132] == b"DICM":  # after the preamble, which may hold another format's magic
        return "DICOM"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


FIX = (
    "send a smaller file or fewer files (the server's serve.max_upload_bytes and "
    "serve.max_batch_files)."
)


class BodyLimit:
    """ASGI middleware: refuse bodies above a limit per path prefix with 413, before reading them;
    each limit carries the settings that make it, for the message."""

    def __init__(
        self, app: Any, *, default: tuple[int, str], larger: dict[str, tuple[int, str]]
    ) -> None:
        self.app, self.default, self.larger = app, default, larger

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit, reason = next(
            (limit for prefix, limit in self.larger.items() if path.startswith(prefix)),
            self.default,
        )
        error = f"the request body is larger than {limit} bytes ({reason})."
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            refusal = JSONResponse(
                {"error": error, "fix": FIX}, status_code=413, headers={"connection": "close"}
            )
            return await refusal(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # no Content-Length to refuse early: grew while streaming
                    raise HTTPException(status_code=413, detail=error)
            return message

        await self.app(scope, limited_receive, send)
