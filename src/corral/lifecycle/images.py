"""The image store as the CLI manages it (``corral images``, ``pull``, ``rmi``, ``import``).

Images are :mod:`corral.runtime.images`' (where an image becomes a rootfs); the CLI reaches
them through this layer (docs/design.md, "Layers"). A create resolves its image through
:func:`corral.lifecycle.sandboxes.resolve_image`.
"""

from __future__ import annotations

from corral.runtime.images import Image, ImageStore
from corral.runtime.paths import images_dir

__all__ = ["Image", "ImageStore", "images_dir"]
