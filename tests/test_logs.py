"""The log sinks: the rotated file, and what the JSON and Stackdriver lines hold."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from coderagent.observe.logs import (
    LOG_FILE_NAME,
    ROTATE_BYTES,
    ROTATED_FILES,
    RecentLines,
    agentLogObserver,
    rotatingLogFile,
)


def publish(**sinks: object) -> Logger:
    publisher = LogPublisher()
    publisher.addObserver(agentLogObserver(**sinks))  # type: ignore[arg-type]
    return Logger(namespace="coderagent.test", observer=publisher)


def test_the_log_file_rotates_at_5_mb_and_keeps_10(tmp_path: Path) -> None:
    logFile = rotatingLogFile(str(tmp_path))
    log = publish(logFile=logFile)
    line = "x" * 1000
    for _ in range((ROTATE_BYTES // 1000) * (ROTATED_FILES + 2)):
        log.info(line)
    logFile.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([LOG_FILE_NAME] + [f"{LOG_FILE_NAME}.{i}" for i in range(1, 11)])
    assert all(p.stat().st_size <= ROTATE_BYTES + 2000 for p in tmp_path.iterdir())
    assert (tmp_path / LOG_FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_json_and_stackdriver_carry_message_level_logger_and_fields() -> None:
    js, sd, human = io.StringIO(), io.StringIO(), io.StringIO()
    recent = RecentLines(2)
    log = publish(human=human, jsonOut=js, stackdriver=sd, recent=recent)
    log.warn("port {port} refused for {peer}", port=22, peer="10.0.0.1:5000", blob=b"\xff")
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("it broke", Failure(), what="thing")
    j1, j2 = (json.loads(line) for line in js.getvalue().splitlines())
    assert j1["msg"] == "port 22 refused for 10.0.0.1:5000" and j1["level"] == "WARN"
    assert j1["logger"] == "coderagent.test"
    assert j1["fields"] == {"port": 22, "peer": "10.0.0.1:5000", "blob": "\ufffd"}
    assert j2["level"] == "CRITICAL" and j2["fields"]["error"] == "boom"
    assert "ValueError: boom" in j2["fields"]["traceback"]
    s1, s2 = (json.loads(line) for line in sd.getvalue().splitlines())
    assert (s1["severity"], s1["message"], s1["port"]) == ("WARNING", j1["msg"], 22)
    assert s1["timestamp"] == j1["ts"]
    assert s2["severity"] == "CRITICAL" and s2["what"] == "thing"
    assert "[warn]  coderagent.test: port 22 refused" in human.getvalue()
    assert "ValueError: boom" in human.getvalue()  # the traceback follows the line
    assert len(recent.lines) == 2


def test_conchs_chatter_is_filtered_everywhere() -> None:
    from twisted.conch.ssh.service import SSHService

    js = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(agentLogObserver(jsonOut=js))

    class Chatty(SSHService):
        _log = Logger(observer=publisher)

    Chatty()._log.info("per-packet noise")
    Chatty()._log.error("a real problem")
    [line] = js.getvalue().splitlines()
    assert json.loads(line)["msg"] == "a real problem"
