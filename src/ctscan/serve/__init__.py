"""The HTTP service: FastAPI app, dynamic batching, metrics, drift monitoring, KServe v2."""
