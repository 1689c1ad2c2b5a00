"""corral's main job, end to end, in a world of its own (run by scripts/demo.sh, as root).

It builds a hermetic world of two network namespaces (SPEC section 6): a `host` namespace
where corral runs and an `internet` namespace with web servers on a public-looking address
(203.0.113.10), a second public one (203.0.113.11), a private one (10.77.0.10), a DNS server
authoritative for example.com (www/api/ads), and a real OCI registry (Debian's
docker-registry). It pushes a small image made from this machine's own curl and python3 there,
then drives the `corral` command: pull, sandboxes under the public-only preset, by name and
under deny lists, a custom first-match-wins firewall by name, the audit log, `policy
explain`, and a secret that the sandbox never sees (an HTTPS server of the world's own CA at
203.0.113.12, secure.example.com, keeps every byte it receives, so the demo can show where
the real value went). Nothing leaves the machine; everything is removed at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import dns_server, images, registry, servers, tls_servers  # noqa: E402
from tests.support import world as world_mod  # noqa: E402

CORRAL = str(ROOT / ".venv" / "bin" / "corral")
PUBLIC, OTHER_PUBLIC, PRIVATE = "203.0.113.10", "203.0.113.11", "10.77.0.10"
SECURE, SECURE_NAME = "203.0.113.12", "secure.example.com"
#: The secret of the secrets scene: it must reach the HTTPS server and nothing else.
SECRET_VALUE = "sk-live-demo-7f3a9c"
#: The demo world's DNS: the host namespace's resolv.conf names this server.
ZONES = {
    "zones": ["example.com"],
    "records": [
        ["example.com", "A", 300, PUBLIC],
        ["www.example.com", "CNAME", 300, "example.com"],
        ["api.example.com", "A", 300, OTHER_PUBLIC],
        ["ads.example.com", "A", 300, OTHER_PUBLIC],
        ["intranet.example.com", "A", 300, PRIVATE],
        [SECURE_NAME, "A", 300, SECURE],
    ],
}

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = RESET = ""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def corral(
    *args: str, env: dict[str, str], expect_fail: bool = False
) -> subprocess.CompletedProcess[str]:
    print(f"{DIM}$ corral {shlex.join(args)}{RESET}", flush=True)
    res = subprocess.run([CORRAL, *args], env=env, capture_output=True, text=True, timeout=300)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        print(out)
    mark = (GREEN + "ok" if (res.returncode != 0) == expect_fail else RED + "UNEXPECTED") + RESET
    print(f"{DIM}(exit {res.returncode}){RESET} {mark}", flush=True)
    if (res.returncode != 0) != expect_fail:
        raise SystemExit(f"demo: 'corral {shlex.join(args)}' did not do what it should")
    return res


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (corral builds namespaces, cgroups and nftables)")
    work = Path(tempfile.mkdtemp(prefix="corral-demo-"))
    world = world_mod.build(tag="demo")
    reg = None
    env = dict(os.environ)
    try:
        say("the demo world: servers on a public and a private address, and an OCI registry")
        for addr in (OTHER_PUBLIC, PRIVATE, SECURE):
            world.add_server_address(f"{addr}/32")
        servers.start_servers(world.spawn_inet, [PUBLIC, OTHER_PUBLIC, PRIVATE])
        ca_pem = tls_servers.make_certs(work / "certs", extra_names=[SECURE_NAME])
        capture = work / "capture"
        tls_servers.start_tls_servers(world.spawn_inet, work / "certs", capture, [SECURE])
        dns_server.start_dns_server(
            world.spawn_inet, [world_mod.DNS_V4, world_mod.DNS_V6], ZONES, work / "dns",
            stop=world.stop_process,
        )  # fmt: skip
        reg = registry.start(world, "plain", work / "registry")
        tools = images.build_tools()
        with world.in_host():  # the registry is only reachable from the world's host side
            images.push(reg.client(), reg.host, "demo/tools", tools, tag="latest")
        image = f"{reg.host}/demo/tools:latest"
        print(
            f"internet: http://{PUBLIC}/, http://{OTHER_PUBLIC}/ (public), http://{PRIVATE}/ (private)"
        )
        print(f"registry: {reg.host} holds {image}")
        print(f"https: https://{SECURE_NAME}/ ({SECURE}), a certificate of the world's own CA")
        print(f"dns: {world_mod.DNS_V4} answers for example.com, www, api, ads, intranet, secure")

        # corral reads the host's resolvers at create time; this demo's host is the world's
        # host namespace, whose resolv.conf names the demo DNS server.
        env.update(
            CORRAL_HOME=str(work / "home"),
            CORRAL_INSECURE_REGISTRIES=reg.host,
            CORRAL_RESOLV_CONF=world.resolv_conf,
        )
        with world.in_host():
            say("pull the image (content-addressed, every blob verified)")
            corral("pull", image, env=env)

            say("preset public-only: the public internet yes, private addresses no")
            corral("run", "--net", "public-only", image, "--",
                   "curl", "-sS", "-m", "5", f"http://{PUBLIC}/", env=env)  # fmt: skip
            corral("run", "--net", "public-only", image, "--",
                   "curl", "-sS", "-m", "5", f"http://{PRIVATE}/", env=env, expect_fail=True)  # fmt: skip

            say("names: the sandbox's own DNS answers every query, and the policy decides it")
            corral("run", "--net", "public-only", image, "--",
                   "curl", "-sS", "-m", "5", "http://www.example.com/", env=env)  # fmt: skip
            # A name whose answer is a private address: rebind protection removes it.
            corral("run", "--net", "public-only", image, "--",
                   "curl", "-sS", "-m", "5", "http://intranet.example.com/", env=env,
                   expect_fail=True)  # fmt: skip
            corral("run", "--net", "public-only", "--deny-domain", "ads.example.com", image, "--",
                   "curl", "-sS", "-m", "5", "http://ads.example.com/", env=env,
                   expect_fail=True)  # fmt: skip

            say("a custom first-match-wins firewall by name: only api.example.com, only TCP 80")
            policy = work / "policy.json"
            policy.write_text(
                '{"default_egress": "deny", "default_ingress": "allow",\n'
                ' "rules": [{"action": "allow", "destination": "api.example.com",'
                ' "protocol": "tcp", "port": "80"}]}\n'
            )
            print(policy.read_text().rstrip())
            corral("policy", "check", str(policy), env=env)
            corral("create", "--name", "demo", "--network-file", str(policy), image, env=env)
            try:
                corral("exec", "demo", "--", "curl", "-sS", "-m", "5", "http://api.example.com/",
                       env=env)  # fmt: skip
                # Other names do not resolve; the address itself is refused (not by name).
                corral("exec", "demo", "--", "curl", "-sS", "-m", "5", "http://example.com/",
                       env=env, expect_fail=True)  # fmt: skip
                corral("exec", "demo", "--", "curl", "-sS", "-m", "5", f"http://{OTHER_PUBLIC}/",
                       env=env, expect_fail=True)  # fmt: skip
                corral("exec", "demo", "--", "python3", "-c",
                       "import os; print('uid', os.getuid(), 'host', os.uname().nodename)", env=env)  # fmt: skip
                say("every denial is an audit event that names the rule or default that decided")
                corral("logs", "--net", "demo", env=env)
                say("and any flow can be explained without running it")
                corral("policy", "explain", "--network-file", str(policy),
                       "--to", f"{OTHER_PUBLIC}:80/tcp", env=env)  # fmt: skip
                corral("policy", "explain", "--network-file", str(policy),
                       "--to", f"{OTHER_PUBLIC}:80/tcp", "--names", "api.example.com",
                       "--sni", "api.example.com", env=env)  # fmt: skip
                corral("policy", "explain", "--network-file", str(policy),
                       "--query", "example.com", env=env)  # fmt: skip
                corral("policy", "explain", "--net", "public-only", "--to", "169.254.169.254:80",
                       env=env)  # fmt: skip
            finally:
                subprocess.run([CORRAL, "rm", "-f", "demo"], env=env, capture_output=True)
            say("secrets: the sandbox holds a placeholder; the value goes only to "
                f"{SECURE_NAME}, inside TLS that corral terminates")
            secret_env = dict(env, API_TOKEN=SECRET_VALUE)
            seen = ""
            corral("create", "--name", "agent", "--secret", f"API_TOKEN@{SECURE_NAME}",
                   "--tls-upstream-ca-cert", str(ca_pem), image, env=secret_env)  # fmt: skip
            try:
                seen += corral("exec", "agent", "--", "sh", "-c", 'echo "API_TOKEN=$API_TOKEN"',
                               env=env).stdout  # fmt: skip
                # The server answers the request as it arrived; the real value in that answer
                # is masked back to the placeholder on its way into the sandbox. (HTTP/1.1, so
                # that the server's capture holds the header as text: HTTP/2 compresses it.)
                seen += corral("exec", "agent", "--", "sh", "-c",
                               'curl -sS -m 5 --http1.1 -H "Authorization: Bearer $API_TOKEN" '
                               f"https://{SECURE_NAME}/echo",
                               env=env).stdout  # fmt: skip
                # Anywhere else (another host, plain HTTP) the placeholder is a violation.
                seen += corral("exec", "agent", "--", "sh", "-c",
                               'curl -sS -m 5 -H "Authorization: Bearer $API_TOKEN" '
                               "http://example.com/",
                               env=env, expect_fail=True).stdout  # fmt: skip
                # The violation is an audit event naming the secret and the host, never the value.
                logs = corral("logs", "--net", "agent", env=env).stdout
                inspect = corral("inspect", "agent", env=env).stdout
            finally:
                subprocess.run([CORRAL, "rm", "-f", "agent"], env=env, capture_output=True)
            received = b"".join(p.read_bytes() for p in sorted(capture.glob("*.bin")))
            print(f"the HTTPS server received the real value: {SECRET_VALUE.encode() in received}")
            print(f"the sandbox saw it: {SECRET_VALUE in seen}; inspect or the audit log show "
                  f"it: {SECRET_VALUE in inspect + logs}")  # fmt: skip
            if SECRET_VALUE.encode() not in received or SECRET_VALUE in seen + inspect + logs:
                raise SystemExit("demo: the secret did not go where it should, and only there")
            if "API_TOKEN" not in logs:
                raise SystemExit("demo: the violation is not in the audit log")
        say("done: the sandboxes, their namespaces, firewall tables and cgroups are gone")
    finally:
        with world.in_host():
            subprocess.run([CORRAL, "gc"], env=env, capture_output=True)
        if reg is not None:
            registry.stop(world, reg)
        world_mod.destroy(world)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
