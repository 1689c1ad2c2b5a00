"""Where corral keeps its state on disk.

Every component asks this module instead of computing paths itself, so that ``CORRAL_HOME``
(which the tests point at a temporary directory) moves *all* state at once. It sits at the
top of the package, below both :mod:`corral.runtime` and :mod:`corral.net` (the address
leases live under the same home), and imports nothing of corral. Directories are
created ``0o700`` because they hold image rootfs trees with shifted ownership and sandbox
control sockets that no other local user should reach.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the state directory (tests, non-standard installs).
CORRAL_HOME_ENV = "CORRAL_HOME"

#: State directory when running as root (FHS: variable state of a system service).
SYSTEM_HOME = Path("/var/lib/corral")

#: Mode of every directory created here: state is private to the user running corral.
PRIVATE_DIR_MODE = 0o700


def _ensure(path: Path) -> Path:
    """Create ``path`` (and parents) private if missing; an existing directory is left alone."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


def corral_home() -> Path:
    """The root of corral's state: env ``CORRAL_HOME``, else /var/lib/corral as root, else XDG."""
    env = os.environ.get(CORRAL_HOME_ENV)
    if env:
        home = Path(env).expanduser()
    elif os.geteuid() == 0:
        home = SYSTEM_HOME
    else:
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        home = Path(data) / "corral"
    return _ensure(home.absolute())


def images_dir() -> Path:
    """The content-addressed image store shared by all sandboxes."""
    return _ensure(corral_home() / "images")


def sandboxes_dir() -> Path:
    """One subdirectory per sandbox (state.json, control socket, writable layer, logs)."""
    return _ensure(corral_home() / "sandboxes")
