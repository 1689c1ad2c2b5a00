"""``corral policy check`` and ``corral policy explain``: the policy engine from the shell.

``check FILE`` lints a NetworkConfig file (warnings, exit 0; an invalid file is one sentence
and exit 2). ``explain`` asks about one flow (``--to``) or one DNS question (``--query``)
with the same verdict the data path uses (:mod:`corral.policy.verdict`: port 53 answered
by the DNS interceptor, DoT refused, other sandboxes' addresses, pins and revealed names)
and says where the data path carries it out: refused by the kernel before the handshake
(the prefilter), held for the connection's first bytes, or decided by the proxy. It prints
the decision, the deciding rule in its ``--rule`` form and the reason; ``--json`` prints
``{"action", "rule", "reason", "names", "revealed", "wait_for_name", "handled_by",
"stage"}``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from corral.config import NetworkConfig, PolicyDirection, PolicyProtocol
from corral.config.values import IPAddress, split_hostport
from corral.errors import ConfigError, CorralError
from corral.policy import Policy, rule_shorthand
from corral.policy import verdict as verdicts
from corral.policy.lint import lint
from corral.policy.presets import preset_rules
from corral.policy.verdict import FlowVerdict, Revealed, SandboxView

#: Where the data path carries a verdict out (the ``stage`` of ``--json``).
STAGE_DNS = "dns-interceptor"
STAGE_KERNEL = "kernel"  # refused by the prefilter before the handshake
STAGE_HELD = "held"  # the proxy reads the first bytes, then decides with the revealed name
STAGE_PROXY = "proxy"
_STAGE_TEXT = {
    STAGE_DNS: "answered by the sandbox's DNS interceptor; see --query NAME for a question",
    STAGE_KERNEL: "refused by the kernel before the handshake (connect() fails with "
    "ECONNREFUSED; UDP gets port-unreachable)",
    STAGE_HELD: "held by the proxy for its first bytes (TLS SNI, HTTP Host, :authority); the "
    "name they reveal decides (give it with --sni)",
    STAGE_PROXY: "decided by the proxy",
}

_TO_FORM = "ADDR[:PORT][/PROTO] (IPv6 as [ADDR]:PORT)"


def parse_to(text: str, flag: str = "--to") -> tuple[IPAddress, int | None, PolicyProtocol]:
    """``203.0.113.5:443``, ``[2001:db8::1]:53/udp``, ``10.0.0.1/icmpv4``, ``2001:db8::1``.

    TCP and UDP need a port (a rule's ports cannot be judged without one); ICMP has none.
    """
    body, slash, proto_text = text.strip().partition("/")
    if slash:
        try:
            protocol = PolicyProtocol(proto_text.strip().lower())
        except ValueError:
            raise ConfigError(
                flag, f"{text!r}: {proto_text!r} is not a protocol (tcp, udp, icmpv4, icmpv6)"
            ) from None
    else:
        protocol = PolicyProtocol.TCP
    address, port = split_hostport(body, flag)
    if protocol.is_icmp and port is not None:
        raise ConfigError(flag, f"{text!r}: {protocol} has no ports; drop ':{port}'")
    if not protocol.is_icmp and port is None:
        raise ConfigError(flag, f"{text!r} needs a port for {protocol} ({_TO_FORM})")
    return address, port, protocol


def _host_addresses(values: Sequence[str]) -> list[IPAddress]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_address(v.strip().strip("[]")))
        except ValueError:
            raise ConfigError("--host-address", f"{v!r} is not an IP address") from None
    return out


def _load_file(path: str) -> NetworkConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(path, f"cannot read the file: {exc.strerror}") from None
    try:
        return NetworkConfig.from_json(text)
    except ConfigError as exc:
        raise ConfigError(path, str(exc)) from None


def _fail(exc: CorralError) -> None:
    """Print the one sentence and exit with the error's code (as the root command does)."""
    click.echo(f"corral: {exc}", err=True)
    click.get_current_context().exit(exc.exit_code)


@click.group("policy")
def policy_group() -> None:
    """Check a network policy, or ask it about one flow or one DNS query."""


@policy_group.command("check")
@click.argument("file", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the warnings as a JSON list.")
def check(file: str, as_json: bool) -> None:
    """Lint FILE (a NetworkConfig in the wire format): warn about rules that never match.

    Exits 0 with warnings, 2 (with one sentence) when the file is not a valid config.
    """
    try:
        config = _load_file(file)
    except ConfigError as exc:
        _fail(exc)
        return
    warnings = lint(config)
    if as_json:
        click.echo(
            json.dumps([{"rule": w.rule, "kind": w.kind, "warning": w.message} for w in warnings])
        )
        return
    console = Console(highlight=False, soft_wrap=True)
    n_preset = len(preset_rules(config))
    preset = f" ({n_preset} from preset '{config.policy}')" if n_preset else ""
    total = n_preset + len(config.rules)
    for w in warnings:  # each message names its rule
        console.print(f"[yellow]warning:[/yellow] {escape(w.message)}")
    summary = f"{escape(file)}: {total} rules{preset}, {len(warnings)} warning" + (
        "" if len(warnings) == 1 else "s"
    )
    console.print(f"[green]{summary}[/green]" if not warnings else summary)


def _print_decision(
    console: Console, headline: str, policy: Policy, decision: FlowVerdict, stage: str | None
) -> None:
    colour = "green" if decision.allowed else "red"
    console.print(f"[bold {colour}]{decision.action}[/bold {colour}] {escape(headline)}")
    if decision.rule is not None:
        rule = rule_shorthand(policy.rules[decision.rule])
        console.print(f"  rule:   {decision.rule}  {escape(rule)}")
    else:
        console.print("  rule:   none")
    console.print(f"  reason: {escape(decision.reason)}")
    if decision.names:
        console.print(f"  pinned: {escape(', '.join(decision.names))}")
    if decision.revealed:
        console.print(f"  revealed: {escape(decision.revealed)}")
    if stage is not None:
        console.print(f"  where:  {escape(_STAGE_TEXT[stage])}")


def explain_flow(
    config: NetworkConfig,
    protocol: PolicyProtocol,
    address: IPAddress,
    port: int | None,
    *,
    direction: PolicyDirection = PolicyDirection.EGRESS,
    names: frozenset[str] = frozenset(),
    sni: str | None = None,
    gateways: Sequence[IPAddress] = (),
    host_addresses: Sequence[IPAddress] = (),
    others: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> tuple[Policy, FlowVerdict, str]:
    """The data path's verdict about one flow and where it is carried out.

    The sandbox is described by ``gateways`` (its own gateway addresses; every other address
    of the config's pools belongs to another sandbox, and so does every network in ``others``:
    slots leased from other pools) and ``host_addresses`` (the host's own).
    ``names``: what the sandbox's DNS pinned to the address; ``sni``: the name the connection
    revealed (None: not read, the verdict may wait for it).
    """
    from corral.lifecycle.explain import denied_in_kernel

    gw = [verdicts.unmap(g) for g in gateways]
    policy = Policy.compile(config, host_addresses=[*host_addresses, *gw])
    pools = [ipaddress.ip_network(config.ipv4_pool), ipaddress.ip_network(config.ipv6_pool)]
    if direction is PolicyDirection.INGRESS:
        return policy, verdicts.ingress(policy, protocol, address, port or 0), STAGE_PROXY
    view = SandboxView(frozenset(gw), (*pools, *others), tls_interception=False)
    revealed = None if sni is None else Revealed(sni)
    v = verdicts.egress(policy, view, protocol, address, port, names=names, revealed=revealed)
    if v.handled_by == verdicts.BY_DNS:
        return policy, v, STAGE_DNS
    if v.wait_for_name:
        return policy, v, STAGE_HELD
    if protocol in (PolicyProtocol.TCP, PolicyProtocol.UDP) and port is not None:
        pinned = {address} if names else set()
        if denied_in_kernel(policy, str(protocol), address, port, pools=pools, gateways=gw,
                            pinned=pinned):  # fmt: skip
            return policy, v, STAGE_KERNEL
    return policy, v, STAGE_PROXY


@policy_group.command("explain")
@click.option("--network-file", type=str, help="The NetworkConfig (wire format JSON).")
@click.option(
    "--net", type=str, help="A preset instead of a file: none, public-only, non-local, allow-all."
)
@click.option("--rule", "rules", multiple=True, help="Append a rule (--rule shorthand).")
@click.option("--to", "to", type=str, help=f"The flow's peer: {_TO_FORM}; PROTO defaults to tcp.")
@click.option("--query", type=str, help="A DNS name to decide as the sandbox's query.")
@click.option(
    "--transport",
    type=click.Choice(["udp", "tcp"]),
    default="udp",
    show_default=True,
    help="Transport of the --query.",
)
@click.option(
    "--direction",
    type=click.Choice(["egress", "ingress"]),
    default="egress",
    show_default=True,
    help="For ingress, ADDR is the peer and PORT the guest port.",
)
@click.option("--names", default="", help="Names the sandbox resolved to ADDR (n1,n2).")
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    help="The sandbox's own gateway address (repeatable); other pool addresses are other sandboxes'.",
)
@click.option("--sni", type=str, help="Name the connection revealed (TLS SNI, Host).")
@click.option(
    "--host-address",
    "host_addresses",
    multiple=True,
    help="An address that counts as group 'host' (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"action", "rule", "reason"}.')
def explain(
    network_file: str | None,
    net: str | None,
    rules: tuple[str, ...],
    to: str | None,
    query: str | None,
    transport: str,
    direction: str,
    names: str,
    gateways: tuple[str, ...],
    sni: str | None,
    host_addresses: tuple[str, ...],
    as_json: bool,
) -> None:
    """Decide one flow (--to) or one DNS query (--query) and say which rule decided it.

    Without --network-file or --net the policy is public-only (as for a sandbox).
    Rule indexes count the expanded list: the preset's rules first, then the config's.
    """
    from corral.cli.sandbox import build_network

    try:
        if (to is None) == (query is None):
            raise ConfigError("--to", f"give either --to {_TO_FORM} or --query NAME")
        config = build_network(net=net, network_file=network_file, rules=rules)
        hosts = _host_addresses(host_addresses)
        gws = _host_addresses(gateways)
        # A host address inside the sandbox pools can only be a sandbox's gateway.
        pools = [ipaddress.ip_network(config.ipv4_pool), ipaddress.ip_network(config.ipv6_pool)]
        gws += [h for h in hosts if any(h.version == p.version and h in p for p in pools)]
        stage: str | None = None
        if query is not None:
            policy = Policy.compile(config, host_addresses=hosts)
            d = policy.decide_query(query, PolicyProtocol(transport))
            decision = FlowVerdict(d.allowed, None, d.rule, d.reason, handled_by=verdicts.BY_DNS)
            headline = f"query {query} ({transport})"
        else:
            assert to is not None
            address, port, protocol = parse_to(to)
            policy, decision, stage = explain_flow(
                config,
                protocol,
                address,
                port,
                direction=PolicyDirection(direction),
                names=frozenset(n.strip() for n in names.split(",") if n.strip()),
                sni=sni,
                gateways=gws,
                host_addresses=hosts,
            )
            group = policy.classify(verdicts.unmap(address))
            headline = f"{direction} {protocol} {to} (group {group or 'none'})"
    except ConfigError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps({**decision.to_dict(), "stage": stage}))
        return
    console = Console(highlight=False, soft_wrap=True)
    _print_decision(console, headline, policy, decision, stage)
    if config.is_offline:
        console.print("  note:   policy 'none' gives the sandbox no network interface at all")


def register(group: click.Group) -> None:
    """Add ``policy check`` and ``policy explain`` to the root command."""
    group.add_command(policy_group)
