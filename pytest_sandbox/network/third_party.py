"""Third-party proxies under test: started inside the lab from a command line, reached like the reference one.

``--sandbox-proxy-cmd "CMD {port}"`` runs the network suite against another proxy (tinyproxy,
squid, smokescreen, ...). The command runs **inside the lab namespace** (network.md §7): a proxy
with no SSRF protection really dials 10.0.0.1 or 169.254.169.254, and only inside the lab do those
addresses belong to canaries on ``lo`` rather than to real hosts on the machine's network.

:func:`start_proxy_command` substitutes ``{port}`` and ``{address}``, starts the command with
``NetworkLab.popen`` (nsenter, which execs) under a :mod:`pytest_sandbox.guardian` in a PID namespace
of its own, waits a bounded time until the port accepts a lab connection and returns a
:class:`ThirdPartyProxy`, which has the surface of ``network_fixtures.RunningProxy``. The PID it holds
is the guardian's (inside the lab's network namespace): stopping it kills everything the command
started, a server it daemonised included (tinyproxy without ``-d``, squid without ``-N``), and
nothing the command forks outlives the session, however the session ends. A third party's decisions are unknown, so
``decisions`` is always empty; the verdicts rest on its replies and the canaries alone.

Names: a third-party proxy resolves with the C library, which reads ``/etc/resolv.conf`` and
``/etc/hosts``. The host's resolver is unreachable from the lab (its only interface is ``lo``), so by
default the command runs in a private mount namespace where both files are bind-mounted over with the
lab's: the DNS stub on 127.0.0.53 and a loopback-only hosts file (network.md §7: "no lookup ever
leaves the namespace", and the name cases must really resolve to their canaries).

:data:`THIRD_PARTY_PROXIES` has a row per ready-made proxy (name, configuration text, argv: tinyproxy and
squid, the two Debian packages); :func:`third_party_command` (or :func:`tinyproxy_command`,
:func:`squid_command`) builds its ``{port}``/``{address}`` command. Neither proxy takes its address on
the command line, so the command runs this module (``python -m pytest_sandbox.network.third_party
tinyproxy|squid CONF_DIR PORT [ADDRESS]``), which writes the configuration and execs the proxy in place,
in the foreground (under the session's guardian, see :mod:`pytest_sandbox.guardian`).
:func:`reference_command` runs the reference proxy the same
way, as a third party (``... reference --host {address} --port {port}``): what a third party's results
are compared with.

``{address}`` is 127.0.0.1 for the proxy under test. The self-connection cases
(:mod:`pytest_sandbox.probes.self_loop`) start further instances on a lab public address and on
0.0.0.0, where a proxy's own address is no longer refused as loopback and only its self check can
refuse it; a command without ``{address}`` cannot be moved there, and those cases say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pytest_sandbox import guardian
from pytest_sandbox.guardian import session_temp_dir

if TYPE_CHECKING:
    import trustme

    from pytest_sandbox.network.proxy.server import EgressProxy

__all__ = [
    "THIRD_PARTY_PROXIES",
    "AttachedProxy",
    "BackendCaError",
    "ProxyStartError",
    "ThirdPartyProxy",
    "ThirdPartyProxySpec",
    "attach_proxy_url",
    "ensure_lab_address",
    "find_free_lab_port",
    "lab_dns_available",
    "load_backend_ca",
    "reference_command",
    "serve_reference_proxy",
    "squid_command",
    "squid_conf_text",
    "start_proxy_command",
    "third_party_command",
    "tinyproxy_command",
    "tinyproxy_conf_text",
    "write_backend_ca",
]

DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
PREFERRED_PORT = 3200
START_TIMEOUT_SECONDS = 10.0
READY_POLL_INTERVAL_SECONDS = 0.05
PROXY_CONNECT_TIMEOUT_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 5.0
STDERR_TAIL_BYTES = 4096
# The lab's DNS stub (pytest_sandbox.network.lab.lab.LAB_DNS_ADDRESS); squid is pointed at it so that a name it
# resolves never depends on the host's resolver (which is unreachable from inside the lab anyway).
LAB_DNS_ADDRESS = "127.0.0.53"
LAB_RESOLV_CONF = f"nameserver {LAB_DNS_ADDRESS}\noptions timeout:1 attempts:1\n"
LAB_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"
# Runs between nsenter and the proxy: a private mount namespace (unshare(1) execs, no fork), the lab's
# resolver files bound over the host's, then exec, so the guardian's child is the proxy itself.
_LAB_DNS_SCRIPT = 'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


class LabLike(Protocol):
    """What this module needs from a :class:`~pytest_sandbox.network.lab.lab.NetworkLab`."""

    def popen(self, argv: list[str], **kwargs: Any) -> Any: ...

    def connect(self, addr: str, port: int, timeout: float = ...) -> socket.socket: ...

    def socket(self, family: int = ..., type: int = ..., proto: int = ...) -> socket.socket: ...


class ProxyStartError(RuntimeError):
    """The proxy command exited, or never accepted a connection, within the start timeout."""


def proxy_url(address: str, port: int) -> str:
    """``http://address:port``, with IPv6 literals bracketed (RFC 3986 §3.2.2)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"

@dataclass
class _ThirdPartyEndpoint:
    """What the suite knows of any proxy it did not write: where it listens, and no decision log."""

    lab: LabLike
    address: str
    port: int

    @property
    def url(self) -> str:
        return proxy_url(self.address, self.port)

    @property
    def decisions(self) -> list[Any]:
        """Unknown for a third-party proxy: the suite judges by its replies and the canaries."""
        return []


@dataclass
class ThirdPartyProxy(_ThirdPartyEndpoint):
    """A proxy started from a command inside a lab; same surface as ``RunningProxy``."""

    command: str
    process: subprocess.Popen[bytes]
    _output: IO[bytes] = field(repr=False)
    uses_lab_dns: bool = False
    _state: Path | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self, timeout: float = PROXY_CONNECT_TIMEOUT_SECONDS) -> socket.socket:
        """A new client connection to the proxy, from a socket inside the lab."""
        return self.lab.connect(self.address, self.port, timeout=timeout)

    def output(self) -> str:
        """The tail of what the proxy wrote to stdout and stderr so far."""
        return _tail(self._output)

    def stop(self) -> None:
        """Stop the proxy's guardian by PID, which kills everything the command started, daemons
        included, and reap it (idempotent)."""
        guardian.stop(self.process, STOP_TIMEOUT_SECONDS)
        self._output.close()
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
            self._state = None


def _tail(output: IO[bytes]) -> str:
    if output.closed:
        return ""
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - STDERR_TAIL_BYTES))
    return output.read().decode("utf-8", "replace").strip()


def find_free_lab_port(lab: LabLike, address: str = DEFAULT_LISTEN_ADDRESS,
                       preferred: int = PREFERRED_PORT) -> int:
    """``preferred`` if nothing in the lab listens there yet, else a port the lab's kernel picks."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for candidate in (preferred, 0):
        probe = lab.socket(family, socket.SOCK_STREAM)
        try:
            probe.bind((address, candidate))
            return int(probe.getsockname()[1])
        except OSError:
            continue
        finally:
            probe.close()
    raise ProxyStartError(f"no free port on {address} inside the lab")


def ensure_lab_address(lab: LabLike, address: str) -> None:
    """Put ``address`` on the lab's ``lo`` unless it is a wildcard or already local there.

    A proxy can only listen on an address of its namespace; the lab's public addresses other than its
    origins are added on demand.
    """
    parsed = ipaddress.ip_address(address)
    holder = getattr(lab, "holder", None)
    if parsed.is_unspecified or parsed.is_loopback or holder is None:
        return
    holder.add_address(str(parsed))


def lab_dns_available(lab: LabLike) -> bool:
    """Whether a command in ``lab`` can get a private mount namespace to bind the lab's resolver files."""
    try:
        probe = lab.popen(["unshare", "--mount", "--propagation", "private", "--", "true"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return False
    try:
        return int(probe.wait(timeout=STOP_TIMEOUT_SECONDS)) == 0
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return False


def _with_lab_dns(argv: list[str], state_dir: Path) -> list[str]:
    resolv_conf = state_dir / "resolv.conf"
    resolv_conf.write_text(LAB_RESOLV_CONF)
    hosts = state_dir / "hosts"
    hosts.write_text(LAB_HOSTS)
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _LAB_DNS_SCRIPT, "lab-dns", str(resolv_conf), str(hosts), *argv]


# What every command started in a lab is handed besides {port} and {address}: the fake inference
# backend (harness.BackendHandoff), as placeholders and environment variables; set once per lab by the
# fixture that starts the backend, so every instance (the self-connection ones too) gets the same.
_HANDED: dict[int, tuple[dict[str, str], dict[str, str]]] = {}


def hand_to_commands(lab: LabLike, placeholders: dict[str, str], env: dict[str, str]) -> None:
    """Every later :func:`start_proxy_command` in ``lab`` substitutes ``placeholders`` and sets ``env``."""
    _HANDED[id(lab)] = (dict(placeholders), dict(env))


def forget_commands(lab: LabLike) -> None:
    """Drop what :func:`hand_to_commands` registered for ``lab`` (the lab is closing)."""
    _HANDED.pop(id(lab), None)


def expand_command(command: str, port: int, address: str, placeholders: dict[str, str]) -> str:
    """``command`` with ``{port}``, ``{address}`` and ``placeholders`` substituted. Pure.

    ``str.replace``, not ``str.format``: a command may contain other braces (shell, JSON arguments).
    A placeholder no value was handed for stays as written (the command then says what it misses).
    """
    expanded = command.replace("{port}", str(port)).replace("{address}", address)
    for name, value in placeholders.items():
        expanded = expanded.replace(name, shlex.quote(value))
    return expanded


def start_proxy_command(lab: LabLike, command: str, *, address: str = DEFAULT_LISTEN_ADDRESS,
                        port: int | None = None, lab_dns: bool = True,
                        start_timeout: float = START_TIMEOUT_SECONDS) -> ThirdPartyProxy:
    """Start ``command`` (``{port}``/``{address}`` substituted) inside ``lab``; wait until it listens.

    What :func:`hand_to_commands` registered for ``lab`` (the fake backend: ``{backend}`` and the
    ``PYTEST_SANDBOX_BACKEND*`` variables) is substituted and set as well.

    With ``lab_dns`` (the default) the command resolves names with the lab's DNS stub and a
    loopback-only hosts file, if the lab allows a private mount namespace (``uses_lab_dns`` says
    whether it did); otherwise it keeps the host's files and only literal addresses resolve.
    Raises ProxyStartError, with the command's output, if it exits or does not accept a lab
    connection on ``address:port`` within ``start_timeout`` seconds; the process is stopped first.
    The caller stops the returned proxy (``.stop()``: its guardian by PID, then wait); a command that
    daemonises keeps the guardian (so ``process.poll()``) running for as long as its server runs.
    """
    if "{port}" not in command:
        raise ValueError(f"the proxy command must contain {{port}}: the lab chooses the port ({command!r})")
    ensure_lab_address(lab, address)
    chosen = find_free_lab_port(lab, address) if port is None else port
    placeholders, handed_env = _HANDED.get(id(lab), ({}, {}))
    expanded = expand_command(command, chosen, address, placeholders)
    argv = shlex.split(expanded)
    if not argv:
        raise ValueError("the proxy command is empty")
    state: Path | None = None
    if lab_dns and lab_dns_available(lab):
        state = session_temp_dir("pytest-sandbox-proxy-")
        argv = _with_lab_dns(argv, state)
    output = tempfile.TemporaryFile()
    try:
        # Under a guardian in its own PID namespace, lingering after the command exits: a command
        # that daemonises stays running (and is stopped) with its server, and nothing it forks
        # outlives the session, however the session ends.
        process = lab.popen(guardian.guarded(argv, pid_namespace=True, linger=True), stdin=subprocess.DEVNULL,
                            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **handed_env})
    except OSError as exc:
        output.close()
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        raise ProxyStartError(f"could not start {expanded!r} inside the lab: {exc}") from exc
    running = ThirdPartyProxy(lab, address, chosen, expanded, process, output, state is not None, state)
    try:
        _wait_until_listening(running, start_timeout)
    except BaseException:
        running.stop()
        raise
    return running


def _wait_until_listening(running: ThirdPartyProxy, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise ProxyStartError(
                f"proxy command {running.command!r} exited with status {running.process.returncode} "
                f"before listening on {running.address}:{running.port}; its output:\n{running.output()}")
        try:
            with running.connect(timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as exc:
            last_error = str(exc)
        time.sleep(READY_POLL_INTERVAL_SECONDS)
    raise ProxyStartError(
        f"proxy command {running.command!r} did not accept a connection on {running.address}:{running.port} "
        f"inside the lab within {timeout:g} s (last error: {last_error}); its output:\n{running.output()}")


@dataclass
class AttachedProxy(_ThirdPartyEndpoint):
    """A proxy the user started inside the lab (``--sandbox-proxy URL``); we neither own nor stop it."""

    def connect(self, timeout: float = PROXY_CONNECT_TIMEOUT_SECONDS) -> socket.socket:
        """A new client connection to the proxy, from a socket inside the lab."""
        return self.lab.connect(self.address, self.port, timeout=timeout)

    def stop(self) -> None:
        """Nothing to do: the proxy's owner stops it."""


def attach_proxy_url(lab: LabLike, url: str,
                     timeout: float = PROXY_CONNECT_TIMEOUT_SECONDS) -> AttachedProxy:
    """Check that ``url`` names a proxy listening **inside** ``lab`` and return a handle to it.

    Refused with ValueError: anything but ``http://IP:PORT`` (a host name would be resolved by the
    host's resolver, outside the lab), and a proxy the lab cannot reach. The lab's only interface is
    ``lo``, so a connection from a lab socket succeeds only if the proxy listens in the lab's own
    namespace. A proxy outside it would dial the real 10.0.0.1 or 169.254.169.254 on the host's
    network when a case gets through (network.md §7), so it is never used.
    """
    fix = ("start the proxy inside the lab with --sandbox-proxy-cmd 'CMD {port}' instead, so that what "
           "it dials are the lab's canaries and not real hosts")
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.username or parts.password or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"--sandbox-proxy {url!r}: expected http://ADDRESS:PORT (plain HTTP proxy, no path)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--sandbox-proxy {url!r}: bad port ({exc})") from exc
    if port is None:
        raise ValueError(f"--sandbox-proxy {url!r}: give the port explicitly")
    try:
        address = str(ipaddress.ip_address(parts.hostname or ""))
    except ValueError as exc:
        raise ValueError(f"--sandbox-proxy {url!r}: the host must be an IP address inside the lab; a name "
                         f"would be resolved outside it; {fix}") from exc
    try:
        lab.connect(address, port, timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"--sandbox-proxy {url!r}: no proxy listens on {address}:{port} inside the lab "
                         f"network namespace ({exc}); a proxy outside the lab is refused because it would "
                         f"send the suite's special-use destinations to the host's network; {fix}") from exc
    return AttachedProxy(lab, address, port)


# --------------------------------------------------------------------------------------------------
# Ready-made commands for Debian's proxies
# --------------------------------------------------------------------------------------------------


def tinyproxy_conf_text(port: int, pid_file: Path, *, address: str = DEFAULT_LISTEN_ADDRESS) -> str:
    """A minimal tinyproxy.conf: listen on ``address:port``, only local clients, no upstream.

    Nothing restricts destinations: that is tinyproxy's stock behaviour (network.md §6, it has no
    destination-address classification), which is what the suite is meant to expose.
    """
    # Allow lists client addresses; a client of a wildcard listener may come from any lab address.
    allow = [] if ipaddress.ip_address(address).is_unspecified else [f"Allow {address}"]
    return "\n".join([
        f"Port {port}",
        f"Listen {address}",
        *allow,
        "Timeout 10",
        "MaxClients 100",
        "LogLevel Critical",
        f"PidFile \"{pid_file}\"",
        "DisableViaHeader Yes",
        "",
    ])


def squid_conf_text(port: int, state_dir: Path, *, address: str = DEFAULT_LISTEN_ADDRESS) -> str:
    """A minimal squid.conf for measurement: forward everything, cache nothing, state in ``state_dir``."""
    return "\n".join([
        f"http_port {address}:{port}",
        "http_access allow all",
        "cache deny all",
        "cache_mem 8 MB",
        "workers 1",
        f"pid_filename {state_dir / 'squid.pid'}",
        "access_log none",
        f"cache_log {state_dir / 'cache.log'}",
        "cache_store_log none",
        f"coredump_dir {state_dir}",
        f"dns_nameservers {LAB_DNS_ADDRESS}",
        "shutdown_lifetime 0 seconds",
        "via off",
        "forwarded_for delete",
        "",
    ])


@dataclass(frozen=True)
class ThirdPartyProxySpec:
    """One proxy the launcher can start: where its configuration goes, what it says, how it is executed.

    ``state_dir`` and ``conf_file`` are templates (``{port}``); ``state_dir`` is relative to the
    launcher's CONF_DIR (``.`` = CONF_DIR itself). ``argv`` follows the binary; ``{conf}`` becomes the
    configuration file. A new third-party proxy is a new row in :data:`THIRD_PARTY_PROXIES`.
    """

    name: str
    fallback_binary: str  # used when the binary is not on PATH
    conf_text: Callable[[int, Path, str], str]  # (port, state dir, listen address) -> configuration
    conf_file: str
    argv: tuple[str, ...]
    state_dir: str = "."
    # Started as root, the proxy drops to its own user (Debian squid: "proxy") and must still write there.
    state_writable_by_all: bool = False

    def conf_path(self, conf_dir: Path, port: int) -> Path:
        return conf_dir / self.state_dir.format(port=port) / self.conf_file.format(port=port)

    def exec_argv(self, binary: str, conf: Path) -> list[str]:
        return [binary, *(str(conf) if part == "{conf}" else part for part in self.argv)]


THIRD_PARTY_PROXIES: dict[str, ThirdPartyProxySpec] = {spec.name: spec for spec in (
    ThirdPartyProxySpec(
        "tinyproxy", "/usr/bin/tinyproxy",
        lambda port, state, address: tinyproxy_conf_text(port, state / f"tinyproxy-{port}.pid", address=address),
        conf_file="tinyproxy-{port}.conf", argv=("-d", "-c", "{conf}")),  # -d: stay in the foreground
    ThirdPartyProxySpec(
        "squid", "/usr/sbin/squid",
        lambda port, state, address: squid_conf_text(port, state, address=address),
        # -N: no daemon, so its output and exit status are the command's; -d 1: fatal messages on stderr.
        conf_file="squid.conf", argv=("-N", "-d", "1", "-f", "{conf}"), state_dir="squid-{port}",
        state_writable_by_all=True),
)}


def _launcher_command(proxy: str, conf_dir: str | os.PathLike[str]) -> str:
    directory = Path(conf_dir).resolve()
    return (shlex.join([sys.executable, "-m", "pytest_sandbox.network.third_party", proxy, str(directory)])
            + " {port} {address}")


def third_party_command(name: str, conf_dir: str | os.PathLike[str]) -> str:
    """A ``--sandbox-proxy-cmd`` for the :data:`THIRD_PARTY_PROXIES` row ``name``: the launcher writes its
    configuration under ``conf_dir`` and execs it in place."""
    if name not in THIRD_PARTY_PROXIES:
        raise ValueError(f"unknown third-party proxy {name!r}; known: {', '.join(sorted(THIRD_PARTY_PROXIES))}")
    return _launcher_command(name, conf_dir)


def tinyproxy_command(conf_dir: str | os.PathLike[str]) -> str:
    """A ``--sandbox-proxy-cmd`` for tinyproxy: writes ``CONF_DIR/tinyproxy-PORT.conf``, execs ``tinyproxy -d``."""
    return _launcher_command("tinyproxy", conf_dir)


def squid_command(conf_dir: str | os.PathLike[str]) -> str:
    """A ``--sandbox-proxy-cmd`` for squid: writes ``CONF_DIR/squid-PORT/squid.conf``, execs ``squid -N``."""
    return _launcher_command("squid", conf_dir)


def reference_command(*launcher: str, intercept_ca_out: str | os.PathLike[str] | None = None) -> str:
    """A ``--sandbox-proxy-cmd`` that runs the reference proxy as a third party, in its own process.

    It listens on ``{address}:{port}`` and allows ports 80, 443 and its own (so that only its self
    check can refuse its own address), resolves with the C library (the lab's DNS, see
    :func:`start_proxy_command`) and dials with ordinary sockets: inside the lab, they are lab sockets.
    ``launcher`` replaces ``python -m pytest_sandbox.network.third_party reference`` (a script that
    calls :func:`serve_reference_proxy` with a weakened proxy class, for instance). With
    ``intercept_ca_out`` it also intercepts ``inference.local:443`` with a CA of its own, written to
    that file (give the same file as ``--sandbox-proxy-ca``), and forwards to the backend pytest-sandbox
    hands it (``{backend}`` and the ``PYTEST_SANDBOX_BACKEND*`` variables).
    """
    prefix = list(launcher) or [sys.executable, "-m", "pytest_sandbox.network.third_party", "reference"]
    command = (shlex.join(prefix)
               + " --host {address} --port {port} --allow-port 80 --allow-port 443 --allow-port {port}")
    if intercept_ca_out is not None:
        out = shlex.join(["--intercept-ca-out", str(Path(intercept_ca_out).resolve())])
        command += f" {out} --backend {{backend}}"
    return command


def _exec_third_party(spec: ThirdPartyProxySpec, conf_dir: Path, port: int, address: str) -> None:
    """Write ``spec``'s configuration for ``address:port`` and exec the proxy (same PID: stop-by-PID works)."""
    conf = spec.conf_path(conf_dir, port)
    state_dir = conf.parent
    state_dir.mkdir(parents=True, exist_ok=True)
    if spec.state_writable_by_all:
        with contextlib.suppress(OSError):
            os.chmod(state_dir, 0o777)
    conf.write_text(spec.conf_text(port, state_dir, address))
    binary = shutil.which(spec.name) or spec.fallback_binary
    os.execv(binary, spec.exec_argv(binary, conf))


async def _system_resolver(name: str) -> list[str]:
    """Resolve with the C library (``/etc/hosts``, ``/etc/resolv.conf``), as a third-party proxy does."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _plain_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


def _route_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


@dataclass(frozen=True)
class InterceptionSetup:
    """How a reference proxy run as a third party intercepts ``CONNECT inference.local:443``.

    It makes a CA of its own (its key never leaves the process) and writes the certificate to
    ``ca_out`` before it listens: that file is what ``--sandbox-proxy-ca`` names. Routed requests go
    to ``backend`` (``HOST:PORT``), verified as ``backend_name`` against ``backend_ca`` (a PEM file),
    with ``backend_key``; the routes are ``policy``'s (a bundled name or a file).
    """

    ca_out: Path
    backend: str
    backend_name: str
    backend_ca: Path
    backend_key: str
    policy: str = "baseline"


def _interceptor_for(setup: InterceptionSetup) -> Callable[[str, int], Any]:
    """The ``connect_interceptor`` of a reference run as a third party (see :class:`InterceptionSetup`)."""
    from pytest_sandbox.inference.ca import InterceptionCA
    from pytest_sandbox.inference.interceptor import InferenceBackendConfig, InferenceInterceptor
    from pytest_sandbox.inference.routing import INFERENCE_HOST, INFERENCE_PORT
    from pytest_sandbox.network.addresses import parse_authority
    from pytest_sandbox.policy.load import load_policy

    ca = InterceptionCA.create()
    setup.ca_out.parent.mkdir(parents=True, exist_ok=True)
    partial = setup.ca_out.with_name(setup.ca_out.name + ".partial")
    partial.write_bytes(ca.cert_pem)
    partial.chmod(0o644)
    partial.replace(setup.ca_out)  # whole or absent: a reader never sees half a certificate
    authority = parse_authority(setup.backend)
    backend = InferenceBackendConfig(
        host=authority.host, port=authority.port, api_key=setup.backend_key, server_hostname=setup.backend_name,
        ca_pem=setup.backend_ca.read_bytes(), routes=load_policy(setup.policy).inference_routes)
    handler = InferenceInterceptor(ca, backend, resolver=_system_resolver, socket_factory=_plain_socket,
                                   record=lambda _decision: None)

    def intercept(host: str, port: int) -> Any:
        return handler if (host, port) == (INFERENCE_HOST, INFERENCE_PORT) else None

    return intercept


def serve_reference_proxy(host: str, port: int, allowed_ports: tuple[int, ...],
                          proxy_class: type[EgressProxy] | None = None,
                          interception: InterceptionSetup | None = None) -> None:
    """Serve the reference proxy (or ``proxy_class``) on ``host:port`` in this process until killed.

    It lives in whatever namespace this process is in: started by :func:`start_proxy_command`,
    that is the lab, so its sockets and its resolver's queries stay there. With ``interception`` it
    intercepts ``inference.local:443`` with a CA of its own, as an external interceptor would.
    """
    from pytest_sandbox.network.proxy.config import ProxyConfig
    from pytest_sandbox.network.proxy.server import EgressProxy, run_on_loop

    intercept = None if interception is None else _interceptor_for(interception)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    config = ProxyConfig(allowed_ports=allowed_ports, connect_timeout=2.0, upstream_timeout=2.0,
                         resolve_timeout=2.0, idle_timeout=5.0)
    proxy = (proxy_class or EgressProxy)(config, resolver=_system_resolver, socket_factory=_plain_socket,
                                             route_socket_factory=_route_socket, connect_interceptor=intercept)
    run_on_loop(proxy.serve(listener))  # uvloop when installed (PYTEST_SANDBOX_PROXY_LOOP chooses)


def _reference_arguments(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pytest_sandbox.network.third_party reference",
                                     description="Serve the reference egress proxy in this process.")
    parser.add_argument("--host", required=True, help="address to listen on")
    parser.add_argument("--port", required=True, type=int, help="port to listen on")
    parser.add_argument("--allow-port", type=int, action="append", default=[], dest="allowed_ports",
                        help="a destination port to allow (repeatable; default 80 and 443)")
    parser.add_argument("--intercept-ca-out", type=Path, default=None, metavar="FILE",
                        help="intercept CONNECT inference.local:443 with a CA of this process's own and write its "
                             "certificate (PEM) to FILE before listening")
    for option, variable, what in (
            ("--backend", BACKEND_VARIABLES[0], "the inference backend, HOST:PORT"),
            ("--backend-name", BACKEND_VARIABLES[1], "the name the backend's certificate is for"),
            ("--backend-ca", BACKEND_VARIABLES[2], "PEM file of the CA that signed the backend's certificate"),
            ("--backend-key", BACKEND_VARIABLES[3], "the route key the backend accepts")):
        parser.add_argument(option, default=os.environ.get(variable), help=f"{what} (default: ${variable})")
    parser.add_argument("--policy", default="baseline", help="policy whose inference routes are forwarded")
    options = parser.parse_args(args)
    if options.intercept_ca_out is not None:
        missing = [f"--{name.replace('_', '-')}" for name in ("backend", "backend_name", "backend_ca", "backend_key")
                   if not getattr(options, name)]
        if missing:
            parser.error(f"--intercept-ca-out needs {', '.join(missing)} (or the {BACKEND_VARIABLES[0]}* variables "
                         "pytest-sandbox sets for the proxy command)")
    return options


# The variables pytest-sandbox hands a proxy command (pytest_sandbox.network.harness.BACKEND_ENV).
BACKEND_VARIABLES = ("PYTEST_SANDBOX_BACKEND", "PYTEST_SANDBOX_BACKEND_NAME", "PYTEST_SANDBOX_BACKEND_CA",
                     "PYTEST_SANDBOX_BACKEND_KEY")


def main_reference(args: list[str], proxy_class: type[EgressProxy] | None = None) -> int:
    """``reference --host H --port P [--allow-port N]... [--intercept-ca-out FILE ...]``: serve until killed."""
    options = _reference_arguments(args)
    interception = None if options.intercept_ca_out is None else InterceptionSetup(
        options.intercept_ca_out, options.backend, options.backend_name, Path(options.backend_ca),
        options.backend_key, options.policy)
    serve_reference_proxy(options.host, options.port, tuple(options.allowed_ports) or (80, 443), proxy_class,
                          interception)
    return 0


# --------------------------------------------------------------------------------------------------
# --sandbox-backend-ca: the fake inference backend's identity, known before any proxy starts
# --------------------------------------------------------------------------------------------------
# A proxy attached with --sandbox-proxy URL is started by its user, not by pytest-sandbox, so nothing can
# be substituted into its command line. Everything else about the backend is fixed (harness.py:
# 11.0.0.20:443 in the lab, named api.inference.test, route key route-key-lab-backend-only); only the
# CA that signs its certificate is per session, unless the user hands one in with --sandbox-backend-ca.

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END \1-----\r?\n?")


class BackendCaError(ValueError):
    """A --sandbox-backend-ca file that cannot sign the backend's certificate (the message says why)."""


def load_backend_ca(path: str | os.PathLike[str]) -> trustme.CA:
    """The CA in ``path`` (its PEM certificate and private key, as ``backend-ca`` writes them), checked:
    readable, exactly one certificate and one key, a CA certificate (RFC 5280 §4.2.1.9 basicConstraints
    cA), and the key is the certificate's. Raises BackendCaError naming the problem."""
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BackendCaError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    blocks = [(match.group(1), match.group(0)) for match in _PEM_BLOCK.finditer(data)]
    certificates = [block for kind, block in blocks if kind == b"CERTIFICATE"]
    keys = [block for kind, block in blocks if kind.endswith(b"PRIVATE KEY")]
    if len(certificates) != 1 or len(keys) != 1:
        raise BackendCaError(f"{path}: expected one PEM certificate and its private key, found {len(certificates)} "
                             f"certificate(s) and {len(keys)} key(s); make one with 'python -m "
                             "pytest_sandbox.network.third_party backend-ca DIR'")
    try:
        certificate = x509.load_pem_x509_certificate(certificates[0])
        key = serialization.load_pem_private_key(keys[0], password=None)
    except (ValueError, TypeError) as exc:
        raise BackendCaError(f"{path}: not a usable certificate and unencrypted key ({exc})") from None
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise BackendCaError(f"{path}: the certificate is not a CA (basicConstraints cA is not set), so it cannot "
                             "sign the backend's certificate")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            certificate.public_key().public_bytes(serialization.Encoding.DER, public):
        raise BackendCaError(f"{path}: the private key is not the certificate's")
    return trustme.CA.from_pem(certificates[0], keys[0])


def write_backend_ca(directory: Path) -> tuple[Path, Path]:
    """A fresh CA for ``--sandbox-backend-ca``: ``backend-ca.pem`` (certificate and key, for pytest only,
    mode 0600) and ``backend-ca-cert.pem`` (the certificate alone: what the proxy is told to trust)."""
    import trustme

    ca = trustme.CA(organization_name="pytest-sandbox fake inference upstream (user held)")
    directory.mkdir(parents=True, exist_ok=True)
    both, cert = directory / "backend-ca.pem", directory / "backend-ca-cert.pem"
    both.touch(mode=0o600)
    both.write_bytes(ca.cert_pem.bytes() + ca.private_key_pem.bytes())
    cert.write_bytes(ca.cert_pem.bytes())
    cert.chmod(0o644)
    return both, cert


USAGE = (f"usage: python -m pytest_sandbox.network.third_party {'|'.join(THIRD_PARTY_PROXIES)} CONF_DIR PORT "
         "[ADDRESS]\n"
         "       python -m pytest_sandbox.network.third_party reference --host ADDRESS --port PORT "
         "[--allow-port N]...\n"
         "       python -m pytest_sandbox.network.third_party backend-ca DIR")


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_sandbox.network.third_party tinyproxy|squid CONF_DIR PORT [ADDRESS]`` or ``reference ...``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["reference"]:
        return main_reference(args[1:])
    if args[:1] == ["backend-ca"] and len(args) == 2:
        both, cert = write_backend_ca(Path(args[1]))
        print(f"--sandbox-backend-ca {both}\nthe proxy trusts {cert} for the backend")
        return 0
    if len(args) not in (3, 4) or args[0] not in THIRD_PARTY_PROXIES or not args[2].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    address = args[3] if len(args) == 4 else DEFAULT_LISTEN_ADDRESS
    try:
        ipaddress.ip_address(address)
    except ValueError:
        print(f"{address!r} is not an IP address\n{USAGE}", file=sys.stderr)
        return 2
    conf_dir = Path(args[1])
    conf_dir.mkdir(parents=True, exist_ok=True)
    _exec_third_party(THIRD_PARTY_PROXIES[args[0]], conf_dir, int(args[2]), address)
    return 1  # not reached: the launcher execs the proxy


if __name__ == "__main__":
    raise SystemExit(main())
