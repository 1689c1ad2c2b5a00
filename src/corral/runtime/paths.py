"""Where corral keeps its state on disk: see :mod:`corral.paths`.

The module moved below both runtime and net (the data path keeps its address leases under the
same ``CORRAL_HOME``, and net must not import runtime); its names are re-exported here so the
runtime's call sites keep working.
"""

from __future__ import annotations

from corral.paths import CORRAL_HOME_ENV as CORRAL_HOME_ENV
from corral.paths import PRIVATE_DIR_MODE as PRIVATE_DIR_MODE
from corral.paths import SYSTEM_HOME as SYSTEM_HOME
from corral.paths import corral_home as corral_home
from corral.paths import images_dir as images_dir
from corral.paths import sandboxes_dir as sandboxes_dir
