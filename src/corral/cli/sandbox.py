"""Sandbox commands of the CLI: run, create, exec, ls, inspect, logs, stop, rm, gc.

Each command is a thin shell over the async SDK (one ``asyncio.run`` per command). The pure
parts (turning flags into a NetworkConfig, ``K=V`` pairs into an env) are plain functions, so
the unit tests check them without a sandbox. Exit codes are in docs/cli.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets as _random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from corral.cli.terminal import (
    SignalHub,
    SignalRelay,
    host_stdin,
    raw_mode,
    terminal_size,
    window_changes,
)
from corral.config import (
    DNSConfig,
    NetworkConfig,
    NetworkPolicy,
    TLSConfig,
    parse_publish,
    parse_rule,
    parse_secret,
)
from corral.errors import ConfigError, SandboxError
from corral.lifecycle import sandboxes
from corral.lifecycle.access import DEFAULT_TERMINAL_SIZE

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of ``run``/``exec`` when the command does not exist in the sandbox (as a shell).
EXIT_COMMAND_NOT_FOUND = 127
#: Exit code of ``run``/``exec`` when the command exists but cannot be executed (as a shell).
EXIT_NOT_EXECUTABLE = 126
#: Exit code after Ctrl-C (128 + SIGINT, as a shell).
EXIT_INTERRUPTED = 130

PRESETS = {
    "none": NetworkPolicy.none,
    "public-only": NetworkPolicy.public_only,
    "non-local": NetworkPolicy.non_local,
    "allow-all": NetworkPolicy.allow_all,
}


# -- pure helpers (unit-tested) ---------------------------------------------------------------


def parse_env(pairs: Sequence[str], flag: str = "--env") -> dict[str, str]:
    """``K=V`` pairs as a dict; a bare ``K`` takes the host's value of K (as docker does)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise ConfigError(flag, f"{pair!r} is not KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise ConfigError(flag, f"{pair!r} has no value and ${key} is not set on the host")
            value = os.environ[key]
        env[key] = value
    return env


def build_network(
    *,
    net: str | None = None,
    network_file: str | None = None,
    rules: Sequence[str] = (),
    default_egress: str | None = None,
    default_ingress: str | None = None,
    publish: Sequence[str] = (),
    max_connections: int | None = None,
    ipv4_pool: str | None = None,
    ipv6_pool: str | None = None,
    deny_domains: Sequence[str] = (),
    dns_nameservers: Sequence[str] = (),
    tls: bool = False,
    tls_bypass: Sequence[str] = (),
    dns_query_timeout_ms: int | None = None,
    dns_rebind_protection: bool | None = None,
    tls_upstream_ca_certs: Sequence[str] = (),
    tls_verify_upstream: bool | None = None,
    block_quic: bool = False,
    on_secret_violation: str | None = None,
    tls_intercepted_ports: Sequence[int] = (),
    tls_ca_cert: str | None = None,
    tls_ca_key: str | None = None,
    trust_host_cas: bool = False,
) -> NetworkConfig:
    """The NetworkConfig the network flags describe (SPEC section 1, one flag per field).

    ``--network-file`` gives the base config (wire format), else ``--net`` a preset, else
    ``public-only``; the other flags then override or extend that base (``--rule`` appends
    after the base's rules, ``-p`` adds published ports).
    """
    if network_file is not None and net is not None:
        raise ConfigError("--net", "give either --net or --network-file, not both")
    if network_file is not None:
        try:
            text = Path(network_file).read_text()
        except OSError as exc:
            raise ConfigError(
                "--network-file", f"cannot read {network_file}: {exc.strerror}"
            ) from None
        try:
            config = NetworkConfig.from_json(text)
        except ConfigError as exc:
            raise exc.under("--network-file") from None
    elif net is not None:
        if net not in PRESETS:
            raise ConfigError(
                "--net", f"{net!r} is not a preset (one of {', '.join(sorted(PRESETS))})"
            )
        config = PRESETS[net]()
    else:
        config = NetworkPolicy.public_only()
    changes: dict[str, Any] = {}
    if rules:
        changes["rules"] = (*config.rules, *(parse_rule(r) for r in rules))
    if default_egress is not None:
        changes["default_egress"] = default_egress
    if default_ingress is not None:
        changes["default_ingress"] = default_ingress
    if max_connections is not None:
        changes["max_connections"] = max_connections
    if ipv4_pool is not None:
        changes["ipv4_pool"] = ipv4_pool
    if ipv6_pool is not None:
        changes["ipv6_pool"] = ipv6_pool
    if deny_domains:
        exact = [d for d in deny_domains if not d.startswith(".")]
        suffixes = [d for d in deny_domains if d.startswith(".")]
        changes["deny_domains"] = (*config.deny_domains, *exact)
        changes["deny_domain_suffixes"] = (*config.deny_domain_suffixes, *suffixes)
    dns_changes: dict[str, Any] = {}
    if dns_nameservers:
        dns_changes["nameservers"] = tuple(dns_nameservers)
    if dns_query_timeout_ms is not None:
        dns_changes["query_timeout_ms"] = dns_query_timeout_ms
    if dns_rebind_protection is not None:
        dns_changes["rebind_protection"] = dns_rebind_protection
    if dns_changes:
        changes["dns"] = _replace_flagged(config.dns or DNSConfig(), dns_changes, _DNS_FLAGS)
    tls_changes: dict[str, Any] = {}
    base_tls = config.tls or TLSConfig()
    if tls_bypass:
        tls_changes["bypass"] = (*base_tls.bypass, *tls_bypass)
    if tls_upstream_ca_certs:
        tls_changes["upstream_ca_certs"] = (*base_tls.upstream_ca_certs, *tls_upstream_ca_certs)
    if tls_verify_upstream is not None:
        tls_changes["verify_upstream"] = tls_verify_upstream
    if block_quic:
        tls_changes["block_quic"] = True
    if tls_intercepted_ports:
        tls_changes["intercepted_ports"] = (*base_tls.intercepted_ports, *tls_intercepted_ports)
    if tls_ca_cert is not None:
        tls_changes["ca_cert"] = tls_ca_cert
    if tls_ca_key is not None:
        tls_changes["ca_key"] = tls_ca_key
    if trust_host_cas:
        changes["trust_host_cas"] = True
    if tls or tls_changes:
        changes["tls"] = _replace_flagged(base_tls, tls_changes, _TLS_FLAGS)
    if on_secret_violation is not None:
        changes["on_secret_violation"] = on_secret_violation
    if changes:
        try:
            config = dataclasses.replace(config, **changes)
        except ConfigError as exc:
            flag = "--" + exc.path.split(".")[0].split("[")[0].replace("_", "-")
            raise ConfigError(flag, str(exc)) from None
    if publish:
        config = config.merged_ports(port_bindings=[parse_publish(p) for p in publish])
    return config


#: The flags that set DNSConfig's and TLSConfig's fields, for their error sentences.
_DNS_FLAGS = {
    "nameservers": "--dns-nameserver",
    "query_timeout_ms": "--dns-query-timeout-ms",
    "rebind_protection": "--no-dns-rebind-protection",
}
_TLS_FLAGS = {
    "bypass": "--tls-bypass",
    "upstream_ca_certs": "--tls-upstream-ca-cert",
    "verify_upstream": "--tls-no-verify-upstream",
    "block_quic": "--block-quic",
    "intercepted_ports": "--tls-intercepted-port",
    "ca_cert": "--tls-ca-cert",
    "ca_key": "--tls-ca-key",
}


def _replace_flagged(base: Any, changes: dict[str, Any], flags: dict[str, str]) -> Any:
    """``dataclasses.replace(base, **changes)`` with a ConfigError naming the flag."""
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as exc:
        field = exc.path.split(".")[0].split("[")[0]
        raise ConfigError(flags.get(field, field), exc.message) from None


def parse_env_file(path: str, flag: str = "--env-file") -> dict[str, str]:
    """The variables of an env file as docker reads one: ``KEY=VALUE`` per line, taken
    verbatim (no quotes removed), ``#`` comments and blank lines skipped, a bare ``KEY``
    takes the host's value (and is skipped when the host has none)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(flag, f"cannot read {path}: {reason}") from None
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not key or any(c.isspace() for c in key) or "\0" in line:
            raise ConfigError(flag, f"{path} line {number} is not KEY=VALUE: {line[:60]!r}")
        if not sep:
            if key in os.environ:
                env[key] = os.environ[key]
            continue
        env[key] = value
    return env


def check_timeout_flag(timeout: float | None, flag: str = "--timeout") -> float | None:
    """``--timeout`` checked as the SDK checks ``timeout`` (ConfigError naming the flag)."""
    from corral.sdk.sandbox import check_timeout

    return check_timeout(timeout, flag)


def run_argv(command: Sequence[str], sandbox_state: Any, entrypoint: str | None) -> list[str]:
    """What ``run`` executes, as docker decides it: the image's Entrypoint followed by
    COMMAND, or by the image's Cmd when no COMMAND is given; ``--entrypoint`` replaces the
    Entrypoint and drops the Cmd (``--entrypoint ''`` clears it)."""
    if entrypoint is not None:
        return ([entrypoint] if entrypoint else []) + list(command)
    return [*sandbox_state.entrypoint, *(list(command) or sandbox_state.cmd)]


def _run_detached(
    image: str,
    command: list[str],
    entrypoint: str | None,
    opts: dict[str, Any],
    others: tuple[bool, bool, bool, float | None],
) -> None:
    """``run -d``: create, start the command detached, print the name; the sandbox stays
    (like ``create``) and the command's output goes to ``corral logs NAME``."""
    interactive, tty, keep, timeout = others
    for flag, given in (("-i", interactive), ("-t", tty), ("--timeout", timeout is not None)):
        if given:
            raise ConfigError(flag, "cannot be combined with -d (the command runs detached)")
    del keep  # a detached sandbox is always kept

    async def go() -> str | int:
        sandbox = await _create_from_options(image, opts)
        try:
            argv = run_argv(command, sandbox.state, entrypoint)
            if not argv:
                raise ConfigError(
                    "COMMAND", f"the image {image!r} has no Entrypoint or Cmd; give a command"
                )
            await sandbox.exec_detached(argv[0], argv[1:])
        except SandboxError as exc:
            await sandbox.remove()
            code = command_exit_code(exc)
            if code is None:
                raise
            click.echo(f"corral: {exc}", err=True)
            return code
        except BaseException:
            await sandbox.remove()
            raise
        return str(sandbox.name)

    result = asyncio.run(go())
    if isinstance(result, int):
        sys.exit(result)
    click.echo(result)


def command_exit_code(error: SandboxError) -> int | None:
    """The shell-style exit code for a command that could not start, else None."""
    text = str(error)
    if text.startswith("command not found in the sandbox"):
        return EXIT_COMMAND_NOT_FOUND
    if text.startswith("command is not executable in the sandbox"):
        return EXIT_NOT_EXECUTABLE
    return None


def strip_separator(command: Sequence[str]) -> list[str]:
    """COMMAND without the ``--`` that separates it from corral's own options.

    The commands stop parsing options at the first positional argument, so a ``--`` after
    IMAGE/NAME reaches us as part of COMMAND; only that first one is ours.
    """
    return list(command[1:]) if command[:1] == ("--",) or command[:1] == ["--"] else list(command)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


def default_name(image: str) -> str:
    """``<image base name>-<6 hex>``: readable in ``corral ls``, unlikely to collide."""
    base = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0].lower()
    base = "".join(c if c in _NAME_CHARS else "-" for c in base).strip("-._") or "sb"
    return f"{base[:50]}-{_random.token_hex(3)}"


# -- shared options ---------------------------------------------------------------------------


def sandbox_options(func: F) -> F:
    """The options of ``run`` and ``create``: resources plus every network flag."""
    options = [
        click.option("--name", help="Sandbox name (default: IMAGE-<random>)."),
        click.option(
            "--net",
            type=click.Choice(sorted(PRESETS)),
            help="Network preset (default: public-only).",
        ),
        click.option(
            "--network-file",
            type=click.Path(dir_okay=False),
            help="Whole NetworkConfig as JSON (wire format).",
        ),
        click.option(
            "--rule",
            "rules",
            multiple=True,
            metavar="RULE",
            help="Append a rule, e.g. allow:egress@api.example.com:tcp:443 (repeatable).",
        ),
        click.option("--default-egress", type=click.Choice(["allow", "deny"])),
        click.option("--default-ingress", type=click.Choice(["allow", "deny"])),
        click.option(
            "-p",
            "--publish",
            multiple=True,
            metavar="[BIND:]HOST:GUEST[/udp]",
            help="Publish a guest port on the host (repeatable).",
        ),
        click.option("--max-connections", type=int, help="Concurrent TCP connections + UDP flows."),
        click.option("--ipv4-pool", metavar="CIDR"),
        click.option("--ipv6-pool", metavar="CIDR"),
        click.option(
            "--deny-domain",
            "deny_domains",
            multiple=True,
            metavar="NAME",
            help="Deny a domain (.suffix for every subdomain) (repeatable).",
        ),
        click.option("--dns-nameserver", "dns_nameservers", multiple=True, metavar="ADDR[:PORT]"),
        click.option("--tls", is_flag=True, help="Turn on TLS interception."),
        click.option("--tls-bypass", multiple=True, metavar="PATTERN"),
        click.option(
            "--tls-upstream-ca-cert",
            "tls_upstream_ca_certs",
            multiple=True,
            metavar="FILE",
            help="Also trust this CA for upstream servers (repeatable).",
        ),
        click.option(
            "--tls-no-verify-upstream",
            is_flag=True,
            help="Do not verify upstream certificates.",
        ),
        click.option("--block-quic", is_flag=True, help="Drop UDP to intercepted ports."),
        click.option(
            "--tls-intercepted-port",
            "tls_intercepted_ports",
            multiple=True,
            type=int,
            metavar="PORT",
            help="Intercept TLS on this TCP port (repeatable; default 443).",
        ),
        click.option("--tls-ca-cert", metavar="FILE", help="Your own interception CA (PEM)."),
        click.option("--tls-ca-key", metavar="FILE", help="The key of --tls-ca-cert (PEM)."),
        click.option(
            "--trust-host-cas", is_flag=True, help="Also ship the host's CA bundle to the guest."
        ),
        click.option(
            "--on-secret-violation",
            type=click.Choice(["block", "block-and-log", "block-and-terminate"]),
        ),
        click.option(
            "--dns-query-timeout-ms", type=int, metavar="MS", help="Bound of each upstream query."
        ),
        click.option(
            "--no-dns-rebind-protection",
            is_flag=True,
            help="Keep private addresses in DNS answers.",
        ),
        click.option(
            "--secret",
            "secret_specs",
            multiple=True,
            metavar="ENV@HOST[,HOST]",
            help="Pass $ENV as a secret usable only toward HOST (repeatable).",
        ),
        click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE"),
        click.option("--cpus", type=float, help="CPU limit (e.g. 0.5)."),
        click.option("--memory", metavar="SIZE", help="Memory limit (e.g. 256m, 1g)."),
        click.option("--workdir", metavar="PATH", help="Working directory (default: image's)."),
        click.option(
            "-v",
            "--volume",
            "volumes",
            multiple=True,
            metavar="HOST:GUEST[:ro]",
            help="Mount a host directory or file (repeatable).",
        ),
        click.option("-u", "--user", metavar="USER[:GROUP]", help="User of every command."),
        click.option("--hostname", metavar="NAME", help="Hostname (default: the name)."),
        click.option(
            "--env-file",
            "env_files",
            multiple=True,
            metavar="FILE",
            help="Read KEY=VALUE lines (repeatable; -e wins).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


async def _create_from_options(
    image: str, opts: dict[str, Any], *, auto_remove: bool = False
) -> Any:
    from corral.sdk.sandbox import Sandbox

    network = build_network(
        net=opts["net"],
        network_file=opts["network_file"],
        rules=opts["rules"],
        default_egress=opts["default_egress"],
        default_ingress=opts["default_ingress"],
        publish=opts["publish"],
        max_connections=opts["max_connections"],
        ipv4_pool=opts["ipv4_pool"],
        ipv6_pool=opts["ipv6_pool"],
        deny_domains=opts["deny_domains"],
        dns_nameservers=opts["dns_nameservers"],
        tls=opts["tls"],
        tls_bypass=opts["tls_bypass"],
        dns_query_timeout_ms=opts["dns_query_timeout_ms"],
        dns_rebind_protection=False if opts["no_dns_rebind_protection"] else None,
        tls_upstream_ca_certs=opts["tls_upstream_ca_certs"],
        tls_verify_upstream=False if opts["tls_no_verify_upstream"] else None,
        block_quic=opts["block_quic"],
        on_secret_violation=opts["on_secret_violation"],
        tls_intercepted_ports=opts["tls_intercepted_ports"],
        tls_ca_cert=opts["tls_ca_cert"],
        tls_ca_key=opts["tls_ca_key"],
        trust_host_cas=opts["trust_host_cas"],
    )
    env: dict[str, str] = {}
    for path in opts["env_files"]:
        env.update(parse_env_file(path))
    env.update(parse_env(opts["env_pairs"]))
    volumes = list(opts["volumes"])
    if volumes:
        from corral.lifecycle.access import check_volumes

        try:
            check_volumes(volumes)
        except ConfigError as exc:
            raise ConfigError("-v", exc.message) from None
    return await Sandbox.create(
        opts["name"] or default_name(image),
        image=image,
        network=network,
        secrets=[parse_secret(s) for s in opts["secret_specs"]],
        env=env,
        cpus=opts["cpus"],
        memory=opts["memory"],
        workdir=opts["workdir"],
        auto_remove=auto_remove,
        user=opts["user"],
        hostname=opts["hostname"],
        volumes=volumes or None,
    )


def check_terminal_flags(tty: bool, interactive: bool, stdin_is_terminal: bool) -> None:
    """ConfigError unless ``-t``/``-i`` fit this stdin (``-it`` needs a terminal, as docker)."""
    if tty and interactive and not stdin_is_terminal:
        raise ConfigError(
            "--tty", "the input is not a terminal (use -i alone to pipe stdin into the command)"
        )


async def _stream_command(
    sandbox: Any,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    interactive: bool = False,
    tty: bool = False,
    signals: SignalHub | None = None,
    user: str | None = None,
) -> int:
    """Run argv in the sandbox with its output streamed to ours; the exit code.

    With ``tty`` the command gets a terminal (window size of ours, resizes followed) and,
    when ``interactive`` on a terminal, ours goes into raw mode meanwhile. ``signals``
    forwards what corral receives to the command once it runs (see cli.terminal).
    """
    raw = tty and interactive and sys.stdin.isatty()
    try:
        stream = await sandbox.exec_stream(
            argv[0],
            list(argv[1:]),
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=host_stdin() if interactive else None,
            tty=tty,
            tty_size=(terminal_size() or DEFAULT_TERMINAL_SIZE) if tty else None,
            user=user,
        )
    except SandboxError as exc:
        start_code = command_exit_code(exc)
        if start_code is None:
            raise
        click.echo(f"corral: {exc}", err=True)
        return start_code
    if signals is not None:
        signals.attach(stream)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    with contextlib.ExitStack() as terminal:
        if raw:
            terminal.enter_context(raw_mode(sys.stdin.fileno()))
        if tty:
            loop = asyncio.get_running_loop()
            terminal.enter_context(
                window_changes(lambda rows, cols: loop.create_task(stream.resize(rows, cols)))
            )
        async for which, data in stream:
            target = err if which == "stderr" else out
            target.write(data)
            target.flush()
        code: int = await stream.wait()
    if stream.timed_out:
        click.echo(f"corral: {argv[0]!r} timed out after {timeout:g} s and was killed", err=True)
    elif stream.oom_killed:
        click.echo(
            f"corral: {argv[0]!r} was killed: sandbox {sandbox.name!r} hit its memory limit",
            err=True,
        )
    return code


# -- commands ---------------------------------------------------------------------------------


_tty_option = click.option(
    "-t", "--tty", is_flag=True, help="Give the command a terminal (with -i: this one, raw)."
)


@click.command(context_settings={"allow_interspersed_args": False})
@sandbox_options
@click.option("--keep", is_flag=True, help="Keep the sandbox after the command exits.")
@click.option("-i", "--interactive", is_flag=True, help="Stream this terminal's stdin in.")
@_tty_option
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.option("--entrypoint", metavar="CMD", help="Replace the image's Entrypoint (and Cmd).")
@click.option(
    "-d", "--detach", is_flag=True, help="Start COMMAND in the background, print the name."
)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    image: str,
    command: tuple[str, ...],
    keep: bool,
    interactive: bool,
    tty: bool,
    timeout: float | None,
    entrypoint: str | None,
    detach: bool,
    **opts: Any,
) -> None:
    """Create a sandbox from IMAGE, run COMMAND in it, remove it; exit with COMMAND's code.

    Without COMMAND the image's Entrypoint and Cmd run. Put COMMAND after `--`. SIGINT,
    SIGTERM and SIGHUP are forwarded to the command (a second one kills it); the sandbox
    is removed however corral ends, even by SIGKILL (unless --keep).
    """
    timeout = check_timeout_flag(timeout)
    if detach:
        _run_detached(image, strip_separator(command), entrypoint, opts, (interactive, tty, keep,
                      timeout))  # fmt: skip
        return
    check_terminal_flags(tty, interactive, sys.stdin.isatty())

    async def go() -> int:
        relay = SignalRelay()
        task = asyncio.current_task()
        assert task is not None
        with SignalHub(relay, task) as signals:
            try:
                # auto_remove: the supervisor removes the sandbox if this process dies
                # without doing it (SIGKILL), so not even that leaves one behind.
                sandbox = await _create_from_options(image, opts, auto_remove=not keep)
            except asyncio.CancelledError:
                return relay.exit_code(None)  # a signal during start-up; nothing is left
            code: int | None = None
            try:
                argv = run_argv(strip_separator(command), sandbox.state, entrypoint)
                if not argv:
                    raise ConfigError(
                        "COMMAND", f"the image {image!r} has no Entrypoint or Cmd; give a command"
                    )
                code = await _stream_command(
                    sandbox,
                    argv,
                    timeout=timeout,
                    interactive=interactive,
                    tty=tty,
                    signals=signals,
                )
            except asyncio.CancelledError:
                pass  # a signal before the command started: remove and exit 128+N
            finally:
                relay.cleaning()
                if keep:
                    click.echo(f"corral: kept sandbox {sandbox.name!r}", err=True)
                else:
                    await sandbox.remove()
            return relay.exit_code(code)

    sys.exit(asyncio.run(go()))


@click.command()
@sandbox_options
@click.argument("image")
def create(image: str, **opts: Any) -> None:
    """Create a sandbox from IMAGE and leave it running; prints its name."""

    async def go() -> str:
        sandbox = await _create_from_options(image, opts)
        return str(sandbox.name)

    click.echo(asyncio.run(go()))


@click.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE")
@click.option("-w", "--workdir", metavar="PATH", help="Working directory of the command.")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.option("-i", "--interactive", is_flag=True, help="Stream this terminal's stdin in.")
@_tty_option
@click.option("-u", "--user", metavar="USER[:GROUP]", help="Run as this user.")
@click.option("--env-file", "env_files", multiple=True, metavar="FILE", help="KEY=VALUE lines.")
@click.option("-d", "--detach", is_flag=True, help="Start COMMAND in the background.")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    name: str,
    command: tuple[str, ...],
    env_pairs: tuple[str, ...],
    workdir: str | None,
    timeout: float | None,
    interactive: bool,
    tty: bool,
    user: str | None,
    env_files: tuple[str, ...],
    detach: bool,
) -> None:
    """Run COMMAND in the running sandbox NAME; exit with its code. Put COMMAND after `--`.

    SIGINT, SIGTERM and SIGHUP are forwarded to the command (a second one kills it).
    """
    from corral.sdk.sandbox import Sandbox

    argv = strip_separator(command)
    if not argv:
        raise click.UsageError("give the command to run after NAME (corral exec NAME -- CMD)")
    timeout = check_timeout_flag(timeout)
    env: dict[str, str] = {}
    for path in env_files:
        env.update(parse_env_file(path))
    env.update(parse_env(env_pairs))
    if detach:
        for flag, given in (("-i", interactive), ("-t", tty), ("--timeout", timeout is not None)):
            if given:
                raise ConfigError(flag, "cannot be combined with -d (the command runs detached)")

        async def start_detached() -> int:
            sandbox = await Sandbox.get(name)
            try:
                await sandbox.exec_detached(
                    argv[0], argv[1:], env=env or None, cwd=workdir, user=user
                )
            except SandboxError as exc:
                code = command_exit_code(exc)
                if code is None:
                    raise
                click.echo(f"corral: {exc}", err=True)
                return code
            return 0

        sys.exit(asyncio.run(start_detached()))
    check_terminal_flags(tty, interactive, sys.stdin.isatty())

    async def go() -> int:
        relay = SignalRelay()
        task = asyncio.current_task()
        assert task is not None
        with SignalHub(relay, task) as signals:
            code: int | None = None
            try:
                sandbox = await Sandbox.get(name)
                code = await _stream_command(
                    sandbox,
                    argv,
                    env=env or None,
                    cwd=workdir,
                    timeout=timeout,
                    interactive=interactive,
                    tty=tty,
                    signals=signals,
                    user=user,
                )
            except asyncio.CancelledError:
                pass  # a signal before the command started
            return relay.exit_code(code)

    sys.exit(asyncio.run(go()))


@click.command(name="ls")
@click.option("-q", "--quiet", is_flag=True, help="Names only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sandbox.")
def ls(quiet: bool, as_json: bool) -> None:
    """List sandboxes."""
    import time

    from corral.sdk.sandbox import Sandbox

    sandboxes = asyncio.run(Sandbox.list())
    if quiet:
        for sb in sandboxes:
            click.echo(sb.name)
        return
    if as_json:
        for sb in sandboxes:
            st = sb.state
            click.echo(
                json.dumps(
                    {
                        "name": sb.name,
                        "status": sb.status,
                        "image": sb.image,
                        "created_at": st.created_at,
                    }
                )
            )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "STATUS", "IMAGE", "NETWORK", "CREATED"):
        table.add_column(column)
    now = time.time()
    for sb in sandboxes:
        st = sb.state
        policy = st.network.get("policy") or "custom"
        table.add_row(sb.name, sb.status, sb.image, str(policy), _ago(now - st.created_at))
    Console().print(table)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


@click.command()
@click.argument("name")
def inspect(name: str) -> None:
    """Print everything about sandbox NAME as JSON (secret values redacted)."""
    from corral.sdk.sandbox import Sandbox

    async def go() -> dict[str, Any]:
        return await (await Sandbox.get(name)).info()

    click.echo(json.dumps(asyncio.run(go()), indent=2, sort_keys=True))


@click.command()
@click.option("--net", "net_events", is_flag=True, help="Network audit events (JSON lines).")
@click.option("--supervisor", is_flag=True, help="The supervisor's log even after run -d.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until it stops.")
@click.argument("name")
def logs(net_events: bool, supervisor: bool, follow: bool, name: str) -> None:
    """Print what NAME's detached commands wrote (run -d, exec -d) or, when there is none
    (or with --supervisor), the supervisor's log; with --net its network audit events."""
    from corral.sdk.sandbox import Sandbox

    async def go() -> None:
        sandbox = await Sandbox.get(name)
        if net_events:
            async for event in sandbox.logs(follow=follow):
                click.echo(event.to_json())
            return
        path = sandbox.directory / sandboxes.COMMAND_LOG
        if supervisor or not path.exists() or path.stat().st_size == 0:
            path = sandbox.directory / sandboxes.LOG_FILE
        await _print_file(path, follow, lambda: sandbox.status == sandboxes.RUNNING)

    asyncio.run(go())


#: How often ``logs -f`` looks for new lines (a poll: the file is written by the sandbox).
FOLLOW_INTERVAL = 0.2


async def _print_file(path: Path, follow: bool, running: Callable[[], bool]) -> None:
    """Copy ``path`` to stdout; with ``follow``, keep copying what is appended while
    ``running()`` (and once more after it stops)."""
    out = sys.stdout.buffer
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with handle:
        while True:
            chunk = handle.read(1024 * 1024)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow:
                return
            alive = running()
            await asyncio.sleep(FOLLOW_INTERVAL)
            if not alive:
                follow = False  # read what was written up to the stop, then end


@click.command()
@click.argument("names", nargs=-1, required=True)
def start(names: tuple[str, ...]) -> None:
    """Start stopped sandboxes again (same image, config and writable layer)."""
    from corral.sdk.sandbox import Sandbox

    async def go() -> None:
        for name in names:
            await (await Sandbox.get(name)).start()
            click.echo(name)

    asyncio.run(go())


@click.command()
@click.option(
    "-t",
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds of grace before the sandbox's processes are killed.",
)
@click.argument("names", nargs=-1, required=True)
def stop(timeout: float, names: tuple[str, ...]) -> None:
    """Stop sandboxes (their state stays until `corral rm`)."""
    from corral.sdk.sandbox import Sandbox

    async def go() -> None:
        for name in names:
            await (await Sandbox.get(name)).stop(timeout)
            click.echo(name)

    asyncio.run(go())


@click.command()
@click.option("-f", "--force", is_flag=True, help="Stop running sandboxes first.")
@click.option(
    "-a", "--all", "every", is_flag=True, help="Every sandbox (running ones too with -f)."
)
@click.argument("names", nargs=-1)
def rm(force: bool, every: bool, names: tuple[str, ...]) -> None:
    """Remove sandboxes and their writable layers."""
    from corral.sdk.sandbox import Sandbox

    if every and names:
        raise click.UsageError("give sandbox names or --all, not both")
    if not every and not names:
        raise click.UsageError("give the sandboxes to remove (or --all)")

    async def go() -> None:
        targets = await Sandbox.list() if every else [await Sandbox.get(n) for n in names]
        kept = []
        for sandbox in targets:
            if every and not force and sandbox.status in (sandboxes.RUNNING, sandboxes.CREATING):
                kept.append(sandbox.name)
                continue
            await sandbox.remove(force=force)
            click.echo(sandbox.name)
        if kept:
            click.echo(
                f"corral: kept {len(kept)} running sandbox(es) ({', '.join(kept)}); "
                "add -f to remove them too",
                err=True,
            )

    asyncio.run(go())


@click.command()
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--keep-images", is_flag=True, help="Remove sandboxes only, no images.")
def prune(force: bool, keep_images: bool) -> None:
    """Remove stopped and crashed sandboxes, then every image no sandbox uses."""
    from corral.cli.images import images_in_use
    from corral.lifecycle import gc as gc_mod
    from corral.lifecycle.images import ImageStore
    from corral.sdk.sandbox import Sandbox

    what = "stopped and crashed sandboxes" + ("" if keep_images else " and unused images")
    if not force:
        if not sys.stdin.isatty():
            raise ConfigError(
                "--force", f"prune removes {what} for good; pass -f to do it without asking"
            )
        click.confirm(f"Remove {what}?", abort=True, err=True)

    async def go() -> None:
        failures: list[str] = []
        for line in gc_mod.collect(failures=failures):
            click.echo(f"removed {line}")
        for sandbox in await Sandbox.list():
            if sandbox.status == sandboxes.STOPPED:
                await sandbox.remove()
                click.echo(f"removed sandbox {sandbox.name}")
        for failure in failures:
            click.echo(f"corral: {failure} (its state is kept; run gc again)", err=True)
        if keep_images:
            return
        store = ImageStore()
        used = images_in_use()
        for image in store.list():
            if image.digest not in used:
                store.remove(image.reference)
                click.echo(f"removed image {image.reference}")

    asyncio.run(go())


@click.command()
@click.option("--keep-state", is_flag=True, help="Keep crashed sandboxes' directories.")
@click.argument("names", nargs=-1)
def gc(keep_state: bool, names: tuple[str, ...]) -> None:
    """Remove what crashed sandboxes left behind (processes, cgroups, network, mounts)."""
    from corral.lifecycle import gc as gc_mod

    for name in names:
        sandboxes.validate_name(name)
    failures: list[str] = []
    removed = gc_mod.collect(list(names) or None, keep_state=keep_state, failures=failures)
    for line in removed:
        click.echo(f"removed {line}")
    for failure in failures:
        click.echo(f"corral: {failure} (its state is kept; run gc again)", err=True)
    if failures:
        sys.exit(SandboxError.exit_code)
    if not removed:
        click.echo("nothing to remove", err=True)


def register(group: click.Group) -> None:
    for command in (run, create, exec_command, ls, inspect, logs, start, stop, rm, prune, gc):
        group.add_command(command)
