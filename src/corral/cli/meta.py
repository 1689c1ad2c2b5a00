"""``corral version`` and ``corral completion SHELL``: what corral this is, and shell
completion that knows sandbox and image names.

Completion is click's (``_CORRAL_COMPLETE=bash_source corral`` is what the printed script
calls back); :func:`install_completions` gives every NAME argument the sandbox names and
every IMAGE argument the image references, read straight from ``CORRAL_HOME`` (no store
is opened, nothing is locked: a completion must be fast and must never fail).
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

import click
from click.shell_completion import CompletionItem, get_completion_class

#: Shells click can complete for.
SHELLS = ("bash", "zsh", "fish")

#: The environment variable click's completion scripts call corral back with.
COMPLETE_VAR = "_CORRAL_COMPLETE"


def version_text() -> str:
    try:
        version = metadata.version("corral")
    except metadata.PackageNotFoundError:  # running from a checkout without install
        version = "unknown (not installed)"
    return (
        f"corral {version}\n"
        f"python {platform.python_version()} ({sys.executable})\n"
        f"kernel {platform.system()} {platform.release()} {platform.machine()}"
    )


@click.command("version")
def version() -> None:
    """Print corral's version, the Python it runs on and the kernel."""
    click.echo(version_text())


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (see docs/cli.md to install it)."""
    cls = get_completion_class(shell)
    assert cls is not None
    root = click.get_current_context().find_root().command
    click.echo(cls(root, {}, "corral", COMPLETE_VAR).source())


def sandbox_names(prefix: str = "") -> list[str]:
    from corral.lifecycle import sandboxes

    try:
        return [n for n in sandboxes.list_names() if n.startswith(prefix)]
    except OSError:
        return []


def image_references(prefix: str = "") -> list[str]:
    """Tags in the local store (``docker.io/library/`` shortened as users type it)."""
    from corral.lifecycle.images import images_dir

    try:
        refs = json.loads((images_dir() / "refs.json").read_text())
    except (OSError, ValueError):
        return []
    out = set()
    for ref in refs if isinstance(refs, dict) else ():
        if "@" in ref:
            continue
        short = ref.removeprefix("docker.io/library/").removeprefix("docker.io/")
        out.add(short.removesuffix(":latest"))
    return sorted(r for r in out if r.startswith(prefix))


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[
    CompletionItem
]:
    return [CompletionItem(n) for n in sandbox_names(incomplete)]


def _complete_images(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[
    CompletionItem
]:
    items = [CompletionItem(r) for r in image_references(incomplete)]
    if incomplete.startswith(("/", ".", "~")):
        items.append(CompletionItem(incomplete, type="dir"))
        items.append(CompletionItem(incomplete, type="file"))
    return items


def _complete_cp(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[
    CompletionItem
]:
    if ":" in incomplete and not incomplete.startswith(("/", ".", "~")):
        return []  # a path inside a sandbox: nothing to offer without asking it
    items = [CompletionItem(f"{n}:") for n in sandbox_names(incomplete)]
    items.append(CompletionItem(incomplete, type="file"))
    return items


def install_completions(group: click.Group) -> None:
    """Attach the name/image completers to every command's NAME/IMAGE arguments."""

    def walk(command: click.Command) -> None:
        for param in command.params:
            if not isinstance(param, click.Argument):
                continue
            if param.name in ("name", "names"):
                param._custom_shell_complete = _complete_names
            elif param.name in ("image", "references"):
                param._custom_shell_complete = _complete_images
            elif command.name == "cp" and param.name in ("source", "destination"):
                param._custom_shell_complete = _complete_cp
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    walk(group)


def register(group: click.Group) -> None:
    """Add ``version`` and ``completion``; call :func:`install_completions` after every
    other command is registered."""
    group.add_command(version)
    group.add_command(completion)
