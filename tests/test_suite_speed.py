"""The network suite against a proxy that keeps connections open: same verdicts, no waiting for closes.

``tests/keepalive_proxy.py`` is the reference proxy except that a forwarded answer never ends the
client connection. The SSRF category must judge it exactly as it judges the reference (every case
passes), reading each answer to its framed end; only refusals, whose verdict rests on the close
(network.md §5), are read to EOF. The wall time is measured by ``benchmarks/bench_suite_vs_proxies.py``,
never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from keepalive_proxy import keepalive_command

from pytest_sandbox.probes.ssrf import _answer_without_close

ROOT = Path(__file__).resolve().parent.parent

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.mark.parametrize("received, complete", [
    (OK, True),
    (OK[:-1], False),  # body still in flight
    (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n", False),
    (b"HTTP/1.1 200 OK\r\n\r\nclose-delimited", False),  # RFC 9112 §6.3 rule 8: the close is the framing
    (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno", False),  # a refusal must also close
    (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", False),
    (b"HTTP/1.1 100 Continue\r\n\r\n", False),  # not final
    (b"SSH-2.0-not-http\r\n\r\n", False),
])
def test_an_answer_is_complete_without_the_close_only_when_its_verdict_does_not_need_it(received, complete):
    assert _answer_without_close(bytearray(received)) is complete


def test_keep_alive_proxy_gets_the_references_verdicts_in_the_ssrf_category(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", str(ROOT / "conformance" / "test_ssrf.py"),
         "--sandbox-proxy-cmd", keepalive_command(), "--sandbox-report", str(report),
         "-p", "no:cacheprovider", "-p", "no:randomly", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=570, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    scorecard = json.loads(report.read_text())["scorecard"]
    for category in ("ssrf", "ssrf-controls"):
        row = scorecard[category]
        assert row["ALLOWED"] == row["INDETERMINATE"] == row["BROKEN"] == row["not_run"] == 0, row
        assert row["BLOCKED"] + row["WORKS"] == row["selected"] > 0, row
