"""SDK edges found by trying corral as a new user (issue 10, point 8), on real sandboxes:
status after remove, a str where a sequence belongs, ExecStream.kill() in both APIs, timeouts
beyond the channel's range, the smallest memory limit that still starts, docker's sizes."""

from __future__ import annotations

import asyncio

import pytest

import corral
import corral.sync
from corral import NetworkPolicy
from corral.errors import ConfigError, SandboxError
from corral.sdk import sandbox as sdk
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

NONE = NetworkPolicy.none()


def test_status_after_remove_is_removed(image: str) -> None:
    sb = corral.sync.Sandbox.create(unique("edge"), image=image, network=NONE)
    other = corral.sync.Sandbox.get(sb.name)
    sb.remove()
    assert sb.status == "removed" and other.status == "removed"
    with pytest.raises(SandboxError, match="is removed"):
        other.exec("true")
    other.remove()  # removing what is gone is no error


def test_str_args_type_error_and_timeout_bounds(image: str) -> None:
    with corral.sync.Sandbox.create(unique("edge"), image=image, network=NONE) as sb:
        with pytest.raises(TypeError, match=r"exec\('echo', \['hi'\]\)"):
            sb.exec("echo", "hi")  # type: ignore[arg-type]
        for bad in (0, -5, sdk.MAX_EXEC_TIMEOUT + 1, float("inf")):
            with pytest.raises(ConfigError) as info:
                sb.exec("true", timeout=bad)
            assert info.value.path == "timeout"
        assert sb.exec("echo", ["ok"], timeout=sdk.MAX_EXEC_TIMEOUT).stdout_text == "ok\n"
        # The sandbox is unharmed by the refused calls.
        assert sb.exec("echo", ["hi"]).stdout_text == "hi\n"
    name = unique("edge")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    try:
        res = corral_cli("exec", "--timeout", "0", name, "--", "true")
        assert res.returncode == 2 and res.stderr.startswith(b"corral: --timeout: ")
        res = corral_cli("exec", "--timeout", "9e9", name, "--", "true")
        assert res.returncode == 2 and b"at most" in res.stderr
    finally:
        corral_cli("rm", "-f", name)


def test_kill_behaves_the_same_in_both_apis(image: str) -> None:
    with corral.sync.Sandbox.create(unique("kill"), image=image, network=NONE) as sb:
        stream = sb.exec_stream("sh", ["-c", "echo up; exec sleep 300"])
        assert next(iter(stream)) == ("stdout", b"up\n")
        stream.kill()
        assert stream.wait() == 137  # SIGKILL'd: the sleep's 300 s did not run out
        stream.kill()  # after the end: nothing happens

        async def with_the_async_api() -> tuple[int, int]:
            inner = await corral.Sandbox.get(sb.name)
            first = await inner.exec_stream("sleep", ["300"])
            first.kill()  # without await, as documented and as the sync twin
            code_a = await first.wait()
            second = await inner.exec_stream("sleep", ["300"])
            await second.kill()  # with await: the same
            code_b = await second.wait()
            await inner._close_channel()
            return code_a, code_b

        assert asyncio.run(with_the_async_api()) == (137, 137)


def test_the_smallest_memory_limit_starts(image: str) -> None:
    with corral.sync.Sandbox.create(
        unique("mem"), image=image, network=NONE, memory=sdk.MIN_MEMORY
    ) as sb:
        assert sb.exec("sh", ["-c", "echo started"]).stdout_text == "started\n"
        assert sb.info()["memory"] == sdk.MIN_MEMORY
    with corral.sync.Sandbox.create(unique("mem"), image=image, network=NONE, memory="1.5g") as sb:
        assert sb.info()["memory"] == 1536 * 1024 * 1024
    res = corral_cli("run", "--net", "none", "--memory", "8m", image, "--", "true")
    assert res.returncode == 2 and b"minimum of 16 MiB" in res.stderr
