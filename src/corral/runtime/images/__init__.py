"""Container images: references, registry client, content-addressed store, unpacking.

The public surface is ``ImageStore`` (pull, resolve, list, remove, import_path), ``Image``
(what a sandbox needs: ``rootfs``, ``config``, ``digest``, ``reference``), ``ImageRef`` and the
``ProgressSink`` protocol. See docs/images.md.

The names are loaded on first use: the supervisor and the fork server import
``corral.runtime.images.idmap`` on their start-up path, and pulling in the registry client
(http.client, ssl, hashlib) there costs tens of milliseconds per sandbox start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.runtime.images.reference import ImageRef
    from corral.runtime.images.store import Image, ImageStore, ProgressSink

__all__ = ["Image", "ImageRef", "ImageStore", "ProgressSink"]


def __getattr__(name: str) -> Any:
    if name == "ImageRef":
        from corral.runtime.images.reference import ImageRef

        return ImageRef
    if name in ("Image", "ImageStore", "ProgressSink"):
        from corral.runtime.images import store

        return getattr(store, name)
    raise AttributeError(f"module 'corral.runtime.images' has no attribute {name!r}")
