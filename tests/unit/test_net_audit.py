"""The audit log's reader: whole events only, whatever state the writer left the file in."""

from __future__ import annotations

from pathlib import Path

from corral.net.audit import AUDIT_FILE, AuditLog, read_events


def _write_two(tmp_path: Path) -> Path:
    log = AuditLog("sb", tmp_path)
    for port in (1, 2):
        log.record(direction="egress", protocol="tcp", source="10.0.0.2",
                   destination="203.0.113.5", port=port, action="deny", reason="default egress")
    log.close()
    return tmp_path / AUDIT_FILE


def test_read_events_of_a_missing_and_an_empty_file(tmp_path: Path) -> None:
    assert read_events(tmp_path / AUDIT_FILE) == []
    (tmp_path / AUDIT_FILE).write_bytes(b"")
    assert read_events(tmp_path / AUDIT_FILE) == []


def test_read_events_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = _write_two(tmp_path)
    whole = path.read_bytes()
    assert [e.port for e in read_events(path)] == [1, 2]
    # Every way the writer can be cut off: mid-JSON, mid-UTF-8 character, before the newline.
    third = '{"time":1.0,"sandbox":"sb","reason":"caf\u00e9"}'.encode()
    for cut in range(1, len(third) + 1):
        path.write_bytes(whole + third[:cut])
        assert [e.port for e in read_events(path)] == [1, 2], cut
    path.write_bytes(whole + third + b"\n")
    events = read_events(path)
    assert len(events) == 3 and events[2].reason == "caf\u00e9"
