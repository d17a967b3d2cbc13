"""The HTTP service: FastAPI app, dynamic batching, metrics, drift monitoring, KServe v2."""

from importlib.util import find_spec

from ctscan.errors import CtscanError

_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")  # before any import here
if _missing := [name for name in _EXTRA if find_spec(name) is None]:  # one line, no traceback
    raise CtscanError(f"ctscan serve needs {', '.join(_missing)}.", "pip install 'ctscan[serve]'.")
