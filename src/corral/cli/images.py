"""``corral pull``, ``corral images`` (list), ``corral images rm`` and ``corral images import``.

Pull progress is drawn with rich when stderr is a terminal and not at all otherwise (logs
and CI stay clean); the result is one line on stdout either way.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from corral.errors import ImageError
from corral.lifecycle.images import Image, ImageStore

#: Characters of a digest's hex shown in tables (Docker shows 12).
SHORT_DIGEST = 12


class RichProgress:
    """A ProgressSink drawing one bar per layer and phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def layer_start(self, digest: str, size: int, phase: str) -> None:
        label = f"{phase:8} {digest.split(':')[-1][:SHORT_DIGEST]}"
        total = size if phase == "download" else None
        self.tasks[digest] = self.progress.add_task(label, total=total)

    def layer_advance(self, digest: str, nbytes: int) -> None:
        task = self.tasks.get(digest)
        if task is not None:
            self.progress.advance(task, nbytes)

    def layer_done(self, digest: str) -> None:
        task = self.tasks.pop(digest, None)
        if task is not None:
            total = self.progress.tasks[task].total
            self.progress.update(task, completed=total or 1, total=total or 1)


def _store(ca_file: str | None, insecure: tuple[str, ...]) -> ImageStore:
    return ImageStore(ca_file=ca_file, insecure_registries=insecure)


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{nbytes} B"


def _short(digest: str) -> str:
    return digest.split(":")[-1][:SHORT_DIGEST]


def _result_line(verb: str, image: Image) -> str:
    return f"{verb} {image.reference} {image.digest} ({_size(image.size)})"


_ca_option = click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="CORRAL_REGISTRY_CA_FILE",
    help="Extra CA bundle to trust for registries (added to the system roots).",
)
_insecure_option = click.option(
    "--insecure-registry",
    "insecure",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Registry to reach over plain HTTP (repeatable; also CORRAL_INSECURE_REGISTRIES).",
)


@click.command("pull")
@click.argument("reference")
@_ca_option
@_insecure_option
def pull(reference: str, ca_file: str | None, insecure: tuple[str, ...]) -> None:
    """Fetch image REFERENCE (``alpine``, ``host:5000/team/tool@sha256:...``) into the store."""
    store = _store(ca_file, insecure)
    if sys.stderr.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            image = store.pull(reference, progress=RichProgress(progress))
    else:
        image = store.pull(reference)
    click.echo(_result_line("pulled", image))


@click.group("images", invoke_without_command=True)
@click.option("--quiet", "-q", is_flag=True, help="Print references only.")
@click.pass_context
def images(ctx: click.Context, quiet: bool) -> None:
    """List the images in the local store (subcommands: rm, import)."""
    if ctx.invoked_subcommand is not None:
        return
    listed = ImageStore().list()
    if quiet:
        for image in listed:
            click.echo(image.reference)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("REFERENCE", "DIGEST", "SIZE", "CREATED"):
        table.add_column(column)
    for image in listed:
        created = image.created or ""
        if created:
            try:
                when = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
                created = when.strftime("%Y-%m-%d %H:%M")
            except ValueError:
                pass
        table.add_row(image.reference, _short(image.digest), _size(image.size), created)
    Console(soft_wrap=True).print(table)


def images_in_use() -> dict[str, list[str]]:
    """Image digest -> the sandboxes (running, stopped or crashed) whose rootfs it is.

    A stopped sandbox counts: ``start`` mounts the same image again under its writable layer.
    """
    from corral.errors import SandboxError
    from corral.lifecycle import sandboxes

    used: dict[str, list[str]] = {}
    for name in sandboxes.list_names():
        try:
            sandbox_state = sandboxes.read_state(name)
        except SandboxError:
            continue
        if sandbox_state.image_digest:
            used.setdefault(sandbox_state.image_digest, []).append(name)
    return used


def check_not_in_use(store: ImageStore, reference: str, used: dict[str, list[str]]) -> None:
    """ImageError when removing ``reference`` would delete an image a sandbox stands on
    (removing one of several tags of it is fine: the image stays)."""
    image = store.lookup(reference)
    if image is None or image.digest not in used:
        return
    others = [i for i in store.list() if i.digest == image.digest and i.reference != image.reference]
    if others:
        return
    names = used[image.digest]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ImageError(
        f"image {reference} is used by sandbox {shown}; remove "
        f"{'it' if len(names) == 1 else 'them'} first (corral rm {names[0]})"
    )


@images.command("rm")
@click.argument("references", nargs=-1, required=True)
def images_rm(references: tuple[str, ...]) -> None:
    """Remove REFERENCES from the store (the image goes when its last tag does).

    An image that a sandbox (running or stopped) uses is not removed.
    """
    store = ImageStore()
    used = images_in_use()
    for reference in references:
        check_not_in_use(store, reference, used)
        store.remove(reference)
        click.echo(f"removed {reference}")


@images.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Reference to give the image (default: from the source).")
def images_import(path: Path, name: str | None) -> None:
    """Import a rootfs directory, an OCI layout (dir or tar) or a docker save tar."""
    image = ImageStore().import_path(path, name)
    click.echo(_result_line("imported", image))


def register(group: click.Group) -> None:
    """Add ``pull`` and ``images`` to the ``corral`` command."""
    group.add_command(pull)
    group.add_command(images)
