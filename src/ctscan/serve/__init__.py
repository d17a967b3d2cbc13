"""The HTTP service: FastAPI app, dynamic batching, metrics, drift monitoring, KServe v2."""

from ctscan.errors import require_extra

# before any serve module imports one of them: one line, no traceback
require_extra(
    "serve", "ctscan serve", "fastapi", "uvicorn", "prometheus_client", "python_multipart"
)
