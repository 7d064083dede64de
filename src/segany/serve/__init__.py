"""``segany serve``: a web app to annotate images with clicks, boxes and automatic masks.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). See :mod:`segany.serve.app`.
"""

from .app import ServeSettings, create_app
from .importer import ImportReport, import_coco

__all__ = ["ImportReport", "ServeSettings", "create_app", "import_coco"]
