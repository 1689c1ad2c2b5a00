"""Every example in README.md and docs/*.md runs, as written, in the test world (issue 10,
point 10), so that the docs cannot rot.

What is an example: a fenced block whose language is ``python`` (run with this Python) or
``sh``/``bash``/``shell``/``console`` (run by ``bash -e -o pipefail``, with ``corral`` on the
PATH). Blocks without a language (synopses, outputs, layouts) are not run. A block can be
skipped, visibly, by an HTML comment on the line just above its fence::

    <!-- docs-test: skip: the reason, shown in the test report -->

Each example runs in a fresh directory, as a new process in the world's host namespace, with
what a reader's machine would have, made hermetic:

* ``alpine`` and ``busybox`` (the busybox test image) and ``python:3.12`` (the tools test
  image, with python3) are in the world's registry under docker.io's names, reached through
  ``CORRAL_REGISTRY_MIRROR`` - so ``corral pull alpine`` and ``image="alpine"`` pull for real;
* names resolve through a DNS server in the world (``CORRAL_RESOLV_CONF``): ``example.com``,
  ``api.example.com`` and ``www.example.com`` are the world's HTTP server, which answers
  ``reached <addr>:<port>``; ``ads.example.com`` exists too (so that denying it is visible);
* ``secure.example.com`` is an HTTPS server (tests/support/tls_servers.py: ``/echo`` answers
  the request as it arrived) with a certificate of the world's own CA;
* the working directory holds ``net.json`` and ``policy.json`` (public-only, ads.example.com
  denied), the files the docs' ``--network-file`` examples name, and ``ca.pem``, the world's
  CA, which the docs' TLS examples pass as ``--tls-upstream-ca-cert`` (a real host's
  certificate verifies against the host's roots without it).

An example passes when it exits 0 and leaves no sandbox behind (the README's first example
once leaked its sandbox: that is a failure here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images as images_mod
from tests.support import world as world_mod
from tests.support.dns_server import start_dns_server
from tests.support.registry import RunningRegistry
from tests.support.servers import start_servers
from tests.support.tls_servers import make_certs, start_tls_servers
from tests.support.world import SERVER_V4

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Fence languages that are run, and how.
PYTHON = ("python", "py")
SHELL = ("sh", "bash", "shell", "console")

#: The directive that skips the next block.
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->")
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([A-Za-z0-9_+-]*)")

#: The world's DNS server for the docs (an address of its own on the internet side).
DNS_ADDRESS = "203.0.113.61"
#: The world's HTTPS server for the docs' TLS and secrets examples.
TLS_ADDRESS = "203.0.113.62"
TLS_NAME = "secure.example.com"

#: Seconds one example may take (a pull, a few sandboxes, a network round).
EXAMPLE_TIMEOUT = 240

pytestmark = pytest.mark.timeout(EXAMPLE_TIMEOUT * 2)


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    language: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Example]:
    """The runnable fenced blocks of a markdown file, in order."""
    out: list[Example] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.group(2), match.group(3).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if language not in PYTHON + SHELL:
            continue
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.search(previous)
        out.append(Example(path, start + 1, language, "\n".join(body) + "\n",
                           skip.group(1) if skip else None))  # fmt: skip
    return out


EXAMPLES = [example for path in DOC_FILES for example in extract(path)]

#: The network file the docs' --network-file examples name.
NETWORK_FILE = {"policy": "public-only", "deny_domains": ["ads.example.com"]}


@dataclass
class DocsWorld:
    env: dict[str, str]
    home: Path
    ca_pem: Path


@pytest.fixture(scope="module")
def docs_world(
    world: world_mod.World,
    registry: RunningRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DocsWorld]:
    busybox, tools = images_mod.build_busybox(), images_mod.build_tools()
    client = registry.client()
    with world.in_host():
        for repo, image in (("library/alpine", busybox), ("library/busybox", busybox)):
            images_mod.push(client, registry.host, repo, image)
        images_mod.push(client, registry.host, "library/python", tools, tag="3.12")
    for address in (DNS_ADDRESS, TLS_ADDRESS):
        if f"{address}/32" not in world.extra_addresses:
            world.add_server_address(f"{address}/32")
    work = tmp_path_factory.mktemp("docs-world")
    zones = {
        "zones": ["example.com"],
        "records": [
            [name, "A", 300, SERVER_V4]
            for name in ("example.com", "api.example.com", "www.example.com", "ads.example.com")
        ]
        + [[TLS_NAME, "A", 300, TLS_ADDRESS]],
    }
    ca_pem = make_certs(work / "certs", extra_names=[TLS_NAME])
    dns = start_dns_server(world.spawn_inet, [DNS_ADDRESS], zones, work / "dns",
                           stop=world.stop_process)  # fmt: skip
    servers = start_servers(world.spawn_inet, [SERVER_V4])
    tls_servers = start_tls_servers(world.spawn_inet, work / "certs", work / "capture",
                                    [TLS_ADDRESS])  # fmt: skip
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_ADDRESS}\n")
    home = work / "home"
    env = dict(os.environ)
    env.update(
        CORRAL_HOME=str(home),
        CORRAL_REGISTRY_MIRROR=registry.host,
        CORRAL_INSECURE_REGISTRIES=registry.host,
        CORRAL_RESOLV_CONF=str(resolv),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    try:
        yield DocsWorld(env, home, ca_pem)
    finally:
        world.stop_process(tls_servers)
        world.stop_process(servers)
        dns.stop()
        with world.in_host():
            subprocess.run([sys.executable, "-m", "corral.cli", "gc"], env=env,
                           capture_output=True, timeout=120)  # fmt: skip


def _leftovers(home: Path) -> list[str]:
    root = home / "sandboxes"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


#: The blocks a docs-test directive keeps out, each with its reason (printed by the test
#: below). They are not collected as skipped tests: under CI=true a skip is an error.
SKIPPED = [e for e in EXAMPLES if e.skip is not None]
RUN = [e for e in EXAMPLES if e.skip is None]


def test_skipped_blocks_say_why() -> None:
    for e in SKIPPED:
        assert e.skip and e.skip.strip(), e.id
        print(f"not run: {e.id}: {e.skip}")
    assert RUN, "no example of README.md or docs/ is run"


@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_example_runs(
    example: Example, docs_world: DocsWorld, world: world_mod.World, tmp_path: Path
) -> None:
    for name in ("net.json", "policy.json"):
        (tmp_path / name).write_text(json.dumps(NETWORK_FILE))
    shutil.copy(docs_world.ca_pem, tmp_path / "ca.pem")
    if example.language in PYTHON:
        script = tmp_path / "example.py"
        argv = [sys.executable, str(script)]
    else:
        script = tmp_path / "example.sh"
        argv = ["bash", "-e", "-o", "pipefail", str(script)]
    script.write_text(example.code)
    with world.in_host():
        res = subprocess.run(argv, cwd=tmp_path, env=docs_world.env, capture_output=True,
                             timeout=EXAMPLE_TIMEOUT)  # fmt: skip
        left = _leftovers(docs_world.home)
        for name in left:
            subprocess.run([sys.executable, "-m", "corral.cli", "rm", "-f", name],
                           env=docs_world.env, capture_output=True, timeout=60)  # fmt: skip
    report = (
        f"{example.id} ({example.language}) exited {res.returncode}\n"
        f"--- code\n{example.code}--- stdout\n{res.stdout.decode(errors='replace')[-3000:]}"
        f"--- stderr\n{res.stderr.decode(errors='replace')[-3000:]}"
    )
    assert res.returncode == 0, report
    assert not left, f"{example.id} left sandboxes behind: {left}\n{report}"


def test_examples_were_found() -> None:
    """The extractor sees the README's examples (a broken extractor would pass vacuously)."""
    readme = [e for e in EXAMPLES if e.path.name == "README.md"]
    assert {e.language for e in readme} >= {"python", "sh"}
    assert len(EXAMPLES) >= 6


def test_extractor_reads_fences_and_directives(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```python\nprint(1)\n```\n\n<!-- docs-test: skip: needs a GPU -->\n"
        "```sh\necho hi\n```\n```\nnot run\n```\n~~~bash\necho tilde\n~~~\n"
    )
    got = [(e.language, e.code, e.skip, e.line) for e in extract(doc)]
    assert got == [
        ("python", "print(1)\n", None, 2),
        ("sh", "echo hi\n", "needs a GPU", 7),
        ("bash", "echo tilde\n", None, 13),
    ]
    assert shutil.which("bash") is not None
