"""A deliberately broken proxy: it refuses every request with 403, then dials the target anyway, late.

It judges nothing and forwards nothing; it only shows that a refusal answered *before* a dial proves
nothing by itself. The self-connection cases must catch it: the dial to its own address comes after
the attempt was judged, so only the end-of-run sweep of the lab's socket table can see it.

``python tests/late_self_dialer_proxy.py --host {address} --port {port}`` (:data:`COMMAND`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_sandbox.network.addresses import MalformedTarget, parse_absolute_form, parse_authority

DIAL_DELAY_SECONDS = 0.15
COMMAND = shlex.join([sys.executable, str(Path(__file__).resolve())]) + " --host {address} --port {port}"
REFUSAL = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


async def _late_dial(host: str, port: int) -> None:
    await asyncio.sleep(DIAL_DELAY_SECONDS)
    with contextlib.suppress(OSError):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.close()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.decode("latin-1").partition(" ")
        target = rest.partition(" ")[0]
        writer.write(REFUSAL)
        await writer.drain()
        writer.close()
        try:
            authority = parse_authority(target) if method == "CONNECT" else parse_absolute_form(target)[1]
        except MalformedTarget:
            return
        if authority.ip is not None:  # literals only: the cases that matter here are dotted
            await _late_dial(str(authority.ip), authority.port)


async def _serve(host: str, port: int) -> None:
    server = await asyncio.start_server(_client, host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    options = parser.parse_args(argv)
    asyncio.run(_serve(options.host, options.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
