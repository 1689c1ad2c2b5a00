"""The CLI's rich rendering of pull progress."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from corral.cli.images import RichProgress, _size
from corral.runtime.images import ProgressSink


def test_rich_progress_tracks_layers() -> None:
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=True, width=100)) as progress:
        sink: ProgressSink = RichProgress(progress)
        sink.layer_start("sha256:" + "a" * 64, 1000, "download")
        sink.layer_advance("sha256:" + "a" * 64, 400)
        task = progress.tasks[0]
        assert (task.completed, task.total) == (400, 1000)
        sink.layer_done("sha256:" + "a" * 64)
        assert progress.tasks[0].finished
        sink.layer_start("sha256:" + "a" * 64, 1000, "unpack")
        sink.layer_done("sha256:" + "a" * 64)
        assert all(t.finished for t in progress.tasks)
        sink.layer_advance("sha256:" + "b" * 64, 1)  # unknown layer: ignored
    assert "download aaaaaaaaaaaa" in out.getvalue()


def test_sizes() -> None:
    assert _size(999) == "999 B"
    assert _size(1_036_328) == "1.0 MB"
    assert _size(38_000_000) == "38.0 MB"
    assert _size(5 * 10**12) == "5000.0 GB"
