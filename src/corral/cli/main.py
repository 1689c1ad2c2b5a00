"""The ``corral`` command: a thin click layer over the library.

Errors corral raises on purpose are printed as their one sentence (``corral: ...``) and end
the process with the error class's ``exit_code`` (docs/cli.md lists them); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from corral.cli import copy, images, meta, policy, port, sandbox
from corral.errors import CorralError

#: Exit code after Ctrl-C (128 + SIGINT, as a shell).
EXIT_INTERRUPTED = 130


class CorralGroup(click.Group):
    """A click group that turns CorralError into its sentence and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            click.echo(f"corral: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("corral: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=CorralGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def cli() -> None:
    """corral: sandboxes for untrusted code, with a programmable network."""


sandbox.register(cli)
policy.register(cli)
images.register(cli)
copy.register(cli)
port.register(cli)
meta.register(cli)
meta.install_completions(cli)  # last: it walks every command registered above


def main() -> None:
    cli(prog_name="corral")
    sys.exit(0)
