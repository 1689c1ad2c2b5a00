"""``corral port NAME [GUEST[/PROTO]]``: where a sandbox's published ports listen, as
``docker port`` prints them (``80/tcp -> 127.0.0.1:49153``), random host ports included."""

from __future__ import annotations

import click

from corral.errors import ConfigError
from corral.lifecycle import sandboxes


def published_lines(sandbox_state: sandboxes.SandboxState, selector: str | None = None) -> list[str]:
    """``GUEST/PROTO -> BIND:HOST`` for each published port (``selector``: ``80`` or
    ``53/udp`` keeps only that guest port)."""
    rows = list(sandbox_state.published)
    if not rows:
        # A sandbox whose supervisor did not report its ports (stopped, or from before
        # random ports): its config says where they were asked for.
        from corral.config import NetworkConfig

        config = NetworkConfig.from_dict(sandbox_state.network)
        rows = [b.to_dict() for b in config.all_port_bindings if b.host_port]
    want_port: int | None = None
    want_proto = None
    if selector is not None:
        port_text, _, proto = selector.partition("/")
        if not port_text.isdigit() or proto not in ("", "tcp", "udp"):
            raise ConfigError("PORT", f"{selector!r} is not GUEST[/tcp|/udp]")
        want_port, want_proto = int(port_text), proto or None
    lines = []
    for row in sorted(rows, key=lambda r: (int(r["guest_port"]), str(r["protocol"]))):
        if want_port is not None and int(row["guest_port"]) != want_port:
            continue
        if want_proto is not None and row["protocol"] != want_proto:
            continue
        bind = str(row["bind"])
        where = f"[{bind}]" if ":" in bind else bind
        lines.append(f"{row['guest_port']}/{row['protocol']} -> {where}:{row['host_port']}")
    return lines


@click.command("port")
@click.argument("name")
@click.argument("port", required=False, metavar="[GUEST[/PROTO]]")
def port(name: str, port: str | None) -> None:
    """List NAME's published ports (GUEST/PROTO -> BIND:HOST), or only GUEST's."""
    sandbox_state = sandboxes.read_state(name)
    lines = published_lines(sandbox_state, port)
    if port is not None and not lines:
        raise ConfigError("PORT", f"sandbox {name!r} does not publish guest port {port}")
    for line in lines:
        click.echo(line)


def register(group: click.Group) -> None:
    group.add_command(port)
