"""Container images: references, registry client, content-addressed store, unpacking.

The public surface is ``ImageStore`` (pull, resolve, list, remove, import_path), ``Image``
(what a sandbox needs: ``rootfs``, ``config``, ``digest``, ``reference``), ``ImageRef`` and the
``ProgressSink`` protocol. See docs/images.md.
"""

from corral.runtime.images.reference import ImageRef
from corral.runtime.images.store import Image, ImageStore, ProgressSink

__all__ = ["Image", "ImageRef", "ImageStore", "ProgressSink"]
