"""``segany serve``: a web app to annotate images with clicks, boxes and automatic masks.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). See :mod:`segany.serve.app`.
"""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
