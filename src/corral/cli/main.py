"""The ``corral`` command: a thin click layer over the library."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def cli() -> None:
    """corral: sandboxes for untrusted code, with a programmable network."""


def main() -> None:
    cli()
