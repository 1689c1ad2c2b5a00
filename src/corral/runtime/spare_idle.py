"""How long a sandbox's unused spare worker waits before its init lets it go.

A spare worker (corral.runtime.init) costs ~0.9 MiB: the pages it and the init write after
its fork, which they would otherwise share (bench/density_bench.py). An idle sandbox (a pool
of sandboxes created ahead, an agent between steps) need not pay that; its next request then
waits for one fork of the init (~1.5-3 ms). A create followed by an exec, and a busy sandbox,
never wait: each connection a spare takes brings the next spare at once.

Its own module because two sides read it: the init, from the environment it inherits (the
SDK process's when that process started its fork server, else the creating process's), and
the SDK's start, which refuses a bad value with one sentence before anything is claimed (the
init, as pid 1, cannot report one and falls back to the default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from corral.errors import ConfigError

#: Seconds, when the environment does not say.
SPARE_IDLE = 10.0

#: The environment variable that sets it (a positive number of seconds).
SPARE_IDLE_ENV = "CORRAL_SPARE_IDLE"


def spare_idle(environ: Mapping[str, str] = os.environ) -> float:
    """The seconds an unused spare waits; ConfigError naming the variable if it is not a
    positive, finite number."""
    text = environ.get(SPARE_IDLE_ENV)
    if text is None:
        return SPARE_IDLE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(SPARE_IDLE_ENV, f"must be a positive number of seconds, not {text!r}")
    return value
