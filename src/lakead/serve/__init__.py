"""The lakead service: a FastAPI app over a directory of models, and its web page.

Needs the ``serve`` extra (``pip install 'lakead[serve]'``). Start it with ``lakead serve``
or build the app yourself::

    from lakead.serve import create_app
    app = create_app("models/", backbone="openai/clip-vit-large-patch14-336", token="s3cret")

The API is described in ``docs/SERVICE.md`` and, while it runs, at ``/docs``.
"""

from .app import create_app
from .store import ModelNotFound, ModelStore
from .uploads import ServeLimits, UploadRejected

__all__ = ["ModelNotFound", "ModelStore", "ServeLimits", "UploadRejected", "create_app"]
