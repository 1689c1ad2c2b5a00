"""A sandbox's life: create, supervise, stop, remove, gc.

The one layer that composes :mod:`corral.runtime` (the sandbox's processes, filesystem and
cgroups) and :mod:`corral.net` (its data path), which are peers and never import each other.
The SDK and the CLI call this package (with config and policy). It imports nothing here: the
supervisor (``corral.lifecycle.supervisor``) is on the create's critical path and imports this
package first.
"""
