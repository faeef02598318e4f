"""The egress category's ``netns-escape`` row: a namespace of its own is no boundary if setns(2) leads back out.

Before this row, ``unshare -n sh -c 'ip link set lo up; exec "$@"' sh`` (run as root) and bubblewrap with
``--unshare-net`` run as root (which keeps every capability unless given ``--cap-drop``) earned 15 BLOCKED egress rows
and the control, yet their process could open ``/proc/<pid>/ns/net`` of any host process and setns(2) into the
host's network namespace, from where every destination the proxy guards is one connect(2) away. The probe now calls
setns(2) into its own namespace and into every other one it can name (/proc, /run/netns, its open fds), natively
(nstype CLONE_NEWNET, 0 and with high bits) and through ``int 0x80``, each way in a child a filter may kill.

Each broken launcher here is the cheapest that could fake the row: no filter; a filter that checks the number but not
the architecture (firejail's kind: i386 setns is 346); one that refuses only nstype CLONE_NEWNET (nstype 0 means any
type); one that compares all 64 bits of nstype (an int to the kernel); one that checks nstype on i386 only; a
launcher that clears only the effective capability set. Each must earn ALLOWED; a filter that kills
setns must not take the rest of the probe with it, and one that answers ERRNO(0) must not pass for an entry. The
other way back is a socket the launcher leaked: an unconnected TCP or any UDP socket made outside earns ALLOWED,
with or without the CAP_NET_ADMIN that SIOCGSKNS needs. Safety: nothing is sent from a namespace the probe enters,
and a leaked socket is only tried against the process's own loopback.
"""

from __future__ import annotations

import errno
import shutil
import struct
import sys
from pathlib import Path

import pytest
from test_egress_third_party import HOST, LAB, LAUNCHERS, SPACES, STAND_IN

from pytest_sandbox.verdicts.egress import (
    EscapeAttempt,
    EscapeAttempts,
    HeldSocket,
    Namespaces,
    ProbeReport,
    SetnsResult,
    judge_escape,
)
from pytest_sandbox.verdicts.judgement import Verdict

EPERM = SetnsResult("setns", errno.EPERM)
KILLED = SetnsResult("killed", 31)
ENTERED = SetnsResult("entered", None, "native")


def _attempt(netns: tuple[int, int] | None, native: SetnsResult, i386: SetnsResult | None = EPERM) -> EscapeAttempt:
    return EscapeAttempt(None if netns is None else f"/proc/{netns[1]}/ns/net", netns, native, i386)


def _judge(own: EscapeAttempt, *others: EscapeAttempt, unreadable: dict[str, int] | None = None, proc: bool = True,
           i386_error: str | None = None):
    attempts = EscapeAttempts(own, others, unreadable or {}, proc, i386_error)
    return judge_escape(ProbeReport(LAUNCHERS, {}, None, interfaces=(("lo", True),), escape=attempts), SPACES)


# --- the judge, without a sandbox ---------------------------------------------------------------------------


@pytest.mark.parametrize(("own", "others", "unreadable", "verdict", "reason"), [
    # the host's namespace entered, natively or only through i386: ALLOWED, whatever else was refused
    (_attempt(None, ENTERED), (_attempt(HOST, ENTERED),), {}, Verdict.ALLOWED, "the host's"),
    (_attempt(None, EPERM, SetnsResult("entered", None, "i386")),
     (_attempt(LAB, EPERM), _attempt(HOST, EPERM, SetnsResult("entered", None, "i386"))), {}, Verdict.ALLOWED,
     "(i386)"),
    # setns refused every way (an errno, or the child killed): no handle helps
    (_attempt(None, EPERM), (_attempt(HOST, EPERM),), {}, Verdict.BLOCKED, "refused every way"),
    (_attempt(None, KILLED, KILLED), (), {}, Verdict.BLOCKED, "refused every way"),
    (_attempt(None, EPERM, KILLED), (), {"EACCES": 3}, Verdict.BLOCKED, "refused every way"),
    # setns works: BLOCKED only if every other handle refused, INDETERMINATE if there was none to try
    (_attempt(None, ENTERED), (_attempt(HOST, EPERM),), {}, Verdict.BLOCKED, "each of the 1"),
    (_attempt(None, ENTERED), (), {"EACCES": 72}, Verdict.BLOCKED, "each of the 72"),
    (_attempt(None, ENTERED), (), {}, Verdict.INDETERMINATE, "no other network namespace"),
    (_attempt(None, ENTERED), (_attempt(HOST, SetnsResult("open", errno.ENOENT), None),), {},  # its process ended
     Verdict.INDETERMINATE, "no other network namespace"),
    (_attempt(None, ENTERED), (_attempt(HOST, SetnsResult("open", errno.EACCES), None),), {}, Verdict.BLOCKED,
     "each of the 1"),
    (_attempt(None, EPERM, SetnsResult("entered", None, "i386")), (), {}, Verdict.INDETERMINATE, "(i386)"),
    # no verdict on its own namespace
    (_attempt(None, SetnsResult("open", errno.ENOENT), None), (), {"EACCES": 1}, Verdict.INDETERMINATE,
     "no verdict"),
    (_attempt(None, SetnsResult("lost")), (), {}, Verdict.INDETERMINATE, "no verdict"),
])
def test_the_escape_judge(own, others, unreadable, verdict, reason):
    judgement = _judge(own, *others, unreadable=unreadable)
    assert judgement.verdict is verdict and reason in judgement.reason, judgement


def test_an_escape_judgement_needs_the_i386_way_and_a_proc_to_look_in():
    untried = _judge(_attempt(None, EPERM, None), i386_error="cannot map the int 0x80 stub: EACCES")
    assert untried.verdict is Verdict.INDETERMINATE and "i386" in untried.reason
    blind = _judge(_attempt(None, ENTERED), unreadable={"EACCES": 2}, proc=False)
    assert blind.verdict is Verdict.INDETERMINATE and "without /proc" in blind.reason
    assert judge_escape(ProbeReport(LAUNCHERS, {}, None), SPACES).verdict is Verdict.INDETERMINATE  # no attempts at all
    failed = EscapeAttempts(None, (), {}, False, error="cannot fork a child to call setns(2) in: EPERM")
    judged = judge_escape(ProbeReport(LAUNCHERS, {}, None, escape=failed), SPACES)
    assert judged.verdict is Verdict.INDETERMINATE and "cannot fork" in judged.reason
    # an entry anywhere outweighs a missing i386 way
    assert _judge(_attempt(None, ENTERED, None), _attempt(HOST, ENTERED, None),
                  i386_error="no stub").verdict is Verdict.ALLOWED


# --- broken filters, loaded by bubblewrap run as root (it keeps CAP_SYS_ADMIN without --cap-drop) ------------

AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
RET_KILL_PROCESS, RET_ALLOW, RET_EPERM = 0x80000000, 0x7FFF0000, 0x00050000 | errno.EPERM
SETNS, CLONE_NEWNET = 308, 0x40000000
LD_NR, LD_ARCH, LD_ARG1_LOW, LD_ARG1_HIGH = (0x20, 0), (0x20, 4), (0x20, 24), (0x20, 28)  # struct seccomp_data


def _bpf(*instructions: tuple[int, ...]) -> bytes:
    """struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} from (code, k) or (code, k, jt, jf)."""
    full = (instruction if len(instruction) == 4 else (*instruction, 0, 0) for instruction in instructions)
    return b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, k, jt, jf in full)


def _jeq(value: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    return (0x15, value, jt, jf)


ARCH_CHECKED = (LD_ARCH, _jeq(AUDIT_ARCH_X86_64, 1, 0), (0x06, RET_KILL_PROCESS), LD_NR)
BROKEN_FILTERS = {
    # firejail's kind: the number alone, so i386 setns (346) is another call
    "number-only": _bpf(LD_NR, _jeq(SETNS, 0, 1), (0x06, RET_EPERM), (0x06, RET_ALLOW)),
    # refuses setns(fd, CLONE_NEWNET) only: setns(fd, 0) joins whatever namespace fd is
    "nstype-newnet-only": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 5), LD_ARG1_HIGH, _jeq(0, 0, 3), LD_ARG1_LOW,
                               _jeq(CLONE_NEWNET, 0, 1), (0x06, RET_EPERM), (0x06, RET_ALLOW)),
    # refuses nstype CLONE_NEWNET and 0 comparing all 64 bits: the kernel reads an int, high bits dropped
    "nstype-64-bit": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 6), LD_ARG1_HIGH, _jeq(0, 0, 4), LD_ARG1_LOW,
                          _jeq(CLONE_NEWNET, 1, 0), _jeq(0, 0, 1), (0x06, RET_EPERM), (0x06, RET_ALLOW)),
    # kills the caller of setns(fd, CLONE_NEWNET), lets setns(fd, 0) through: each way needs a child of its own
    "kill-newnet-allow-0": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 3), LD_ARG1_LOW, _jeq(CLONE_NEWNET, 0, 1),
                                (0x06, RET_KILL_PROCESS), (0x06, RET_ALLOW)),
    # refuses every native setns, and the i386 one (346) only with nstype CLONE_NEWNET
    "i386-newnet-only": _bpf(LD_ARCH, _jeq(AUDIT_ARCH_X86_64, 0, 3), LD_NR, _jeq(SETNS, 0, 7), (0x06, RET_EPERM),
                             _jeq(AUDIT_ARCH_I386, 0, 4), LD_NR, _jeq(346, 0, 3), LD_ARG1_LOW,
                             _jeq(CLONE_NEWNET, 2, 1), (0x06, RET_KILL_PROCESS), (0x06, RET_ALLOW), (0x06, RET_EPERM)),
    # refuses nstype CLONE_NEWNET on its low 32 bits (high bits too, then), lets nstype 0 through
    "nstype-newnet-masked": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 3), LD_ARG1_LOW, _jeq(CLONE_NEWNET, 0, 1),
                                 (0x06, RET_EPERM), (0x06, RET_ALLOW)),
    # refuses fork (clone 56, fork 57): the probe cannot call setns in a child, and says so
    "no-fork": _bpf(*ARCH_CHECKED, _jeq(56, 1, 0), _jeq(57, 0, 1), (0x06, RET_EPERM), (0x06, RET_ALLOW)),
    # answers setns with ERRNO(0): it returns 0 and moves nothing (syscalls.md "ERRNO(0)"), no entry to count
    "errno-0": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 1), (0x06, RET_EPERM & ~0xFFFF), (0x06, RET_ALLOW)),
    # kills the caller of setns (and of any i386 call): the probe's other rows must survive it
    "kill-setns": _bpf(*ARCH_CHECKED, _jeq(SETNS, 0, 1), (0x06, RET_KILL_PROCESS), (0x06, RET_ALLOW)),
}
BWRAP_SHARED_PROC = "--unshare-net --dev-bind / / --proc /proc"  # its own network namespace, the host's processes

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def _bwrap_with_filter(directory: Path, name: str, extra: str = "") -> str:
    program = directory / f"{name}.bpf"
    program.write_bytes(BROKEN_FILTERS[name])
    script = directory / f"bwrap-{name}"
    script.write_text(f'#!/bin/sh\nexec 3<{program}\nexec bwrap {BWRAP_SHARED_PROC} {extra} --add-seccomp-fd 3 '
                      '-- "$@"\n')
    script.chmod(0o755)
    return str(script)


@needs_bwrap
@pytest.mark.parametrize(("name", "way"), [("number-only", "(i386)"), ("nstype-newnet-only", "(native nstype 0)"),
                                           ("nstype-64-bit", "(native high bits)"),
                                           ("i386-newnet-only", "(i386 nstype 0)"),
                                           ("kill-newnet-allow-0", "(native nstype 0)")])
def test_a_filter_that_misses_a_way_of_calling_setns_earns_allowed(probe_launcher, tmp_path, name, way):
    evidence = probe_launcher(_bwrap_with_filter(tmp_path, name))
    assert evidence.escape.verdict is Verdict.ALLOWED, evidence.escape
    assert way in evidence.escape.reason and "the host's" in evidence.escape.reason, evidence.escape
    # the rest of the category still holds for it: this row is the one that finds the hole
    verdicts = evidence.verdicts()
    assert verdicts.pop("netns-escape") is Verdict.ALLOWED and verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts


@needs_bwrap
def test_a_filter_that_kills_setns_blocks_it_and_the_probe_reports_everything_else(probe_launcher, tmp_path):
    evidence = probe_launcher(_bwrap_with_filter(tmp_path, "kill-setns"))
    assert evidence.escape.verdict is Verdict.BLOCKED, evidence.escape
    assert "killed by SIGSYS" in evidence.escape.observed
    verdicts = evidence.verdicts()
    assert verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts


@needs_bwrap
def test_a_setns_that_returns_0_and_moves_nothing_is_no_entry(probe_launcher, tmp_path):
    evidence = probe_launcher(_bwrap_with_filter(tmp_path, "errno-0"))
    assert evidence.escape.verdict is Verdict.BLOCKED, evidence.escape
    assert "moved nothing" in evidence.escape.observed and "the host's" in evidence.escape.observed


@needs_bwrap
def test_a_probe_that_cannot_fork_gets_no_escape_verdict_and_keeps_the_others(probe_launcher, tmp_path):
    evidence = probe_launcher(_bwrap_with_filter(tmp_path, "no-fork"))
    assert evidence.escape.verdict is Verdict.INDETERMINATE and "cannot fork" in evidence.escape.reason, \
        evidence.escape
    verdicts = evidence.verdicts()
    del verdicts["netns-escape"]
    assert set(verdicts.values()) == {Verdict.BLOCKED, Verdict.WORKS}, verdicts


@needs_bwrap
def test_bubblewrap_as_root_without_cap_drop_lets_the_process_back_into_the_host_namespace(probe_launcher):
    evidence = probe_launcher(f"bwrap {BWRAP_SHARED_PROC} --")
    assert evidence.escape.verdict is Verdict.ALLOWED, evidence.escape
    assert "the host's" in evidence.escape.reason and "stand-in" in evidence.escape.reason
    # every other row passes: before this row the category passed this launcher
    verdicts = evidence.verdicts()
    del verdicts["netns-escape"]
    assert set(verdicts.values()) == {Verdict.BLOCKED, Verdict.WORKS}, verdicts
    dropped = probe_launcher(f"bwrap {BWRAP_SHARED_PROC} --cap-drop ALL --")
    assert dropped.escape.verdict is Verdict.BLOCKED and "refused every way" in dropped.escape.reason, dropped.escape


@needs_bwrap
def test_setns_that_works_with_no_other_namespace_in_sight_is_indeterminate(probe_launcher):
    # Its own PID namespace and /proc: nothing to try, but root with CAP_SYS_ADMIN could unmount that /proc and
    # find the host's under it, so it is not shown blocked.
    evidence = probe_launcher("bwrap --unshare-net --unshare-pid --dev-bind / / --proc /proc --")
    assert evidence.escape.verdict is Verdict.INDETERMINATE, evidence.escape
    assert "could name no other network namespace" in evidence.escape.reason


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_unshare_with_loopback_up_passed_every_other_row_and_fails_this_one(probe_launcher):
    evidence = probe_launcher("unshare -n sh -c 'ip link set lo up && exec \"$@\"' sh")
    verdicts = evidence.verdicts()
    assert verdicts.pop("netns-escape") is Verdict.ALLOWED, evidence.escape
    assert verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts
    assert "(native)" in evidence.escape.reason and "the host's" in evidence.escape.reason


# --- a launcher that leaks sockets made where it starts ---------------------------------------------------------

LEAKY_LAUNCHER = '''#!{python}
"""Makes sockets in the namespace it starts in, leaves them open across exec, and runs bubblewrap."""
import os, socket, sys
kept = []
for kind in {kinds!r}:
    if kind == "listening":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    elif kind == "connected":
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        sock = socket.create_connection(server.getsockname())
        peer = server.accept()[0]  # both ends go in; the listener is closed at exec (not inheritable)
        os.set_inheritable(peer.fileno(), True)
        kept += [server, peer]
    elif kind == "spent":  # a connection reset by its peer: unconnected to getpeername, but it cannot connect again
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        sock = socket.create_connection(server.getsockname())
        server.close()
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    os.set_inheritable(sock.fileno(), True)
    kept.append(sock)
os.execvp("sh", ["sh", "-c", 'exec 9<"$0"; exec bwrap {bwrap} --add-seccomp-fd 9 -- "$@"', {program!r}, *sys.argv[1:]])
'''


def _leaky(directory: Path, kinds: tuple[str, ...], *, keep_caps: bool) -> str:
    """bubblewrap with the sockets ``kinds`` (tcp, udp, connected, listening) leaked into it; setns killed by its
    filter, so the sockets are the only way out. ``keep_caps``: root keeps CAP_NET_ADMIN (SIOCGSKNS names the
    sockets' namespace); else the probe tells by its own loopback."""
    program = directory / "kill-setns.bpf"
    program.write_bytes(BROKEN_FILTERS["kill-setns"])
    script = directory / f"leaky-{'-'.join(kinds)}-{'caps' if keep_caps else 'nocaps'}"
    bwrap = f"{BWRAP_SHARED_PROC}{'' if keep_caps else ' --cap-drop ALL'}"
    script.write_text(LEAKY_LAUNCHER.format(python=sys.executable, kinds=kinds, bwrap=bwrap, program=str(program)))
    script.chmod(0o755)
    return str(script)


@needs_bwrap
@pytest.mark.parametrize("keep_caps", [True, False], ids=["namespace-by-SIOCGSKNS", "namespace-by-own-loopback"])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_a_leaked_socket_of_the_launcher_s_namespace_earns_allowed(probe_launcher, tmp_path, kind, keep_caps):
    evidence = probe_launcher(_leaky(tmp_path, (kind,), keep_caps=keep_caps))
    assert evidence.escape.verdict is Verdict.ALLOWED, evidence.escape
    assert f"unconnected {kind.upper()} socket (fd " in evidence.escape.reason
    where = "the stand-in host's" if keep_caps else "made in another namespace"
    assert where in evidence.escape.reason, evidence.escape
    verdicts = evidence.verdicts()
    assert verdicts.pop("netns-escape") is Verdict.ALLOWED and verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts  # every other row still passes it


@needs_bwrap
@pytest.mark.parametrize("keep_caps", [True, False], ids=["namespace-by-SIOCGSKNS", "namespace-by-own-loopback"])
def test_a_leaked_connected_listening_or_spent_tcp_socket_leads_nowhere_new(probe_launcher, tmp_path, keep_caps):
    evidence = probe_launcher(_leaky(tmp_path, ("connected", "listening", "spent"), keep_caps=keep_caps))
    assert evidence.escape.verdict is Verdict.BLOCKED, evidence.escape
    for state in ("a connected TCP socket", "a listening TCP socket", "a spent TCP socket"):
        assert state in evidence.escape.observed, evidence.escape


def test_the_held_socket_judge():
    own_ns = LAUNCHERS

    def judged(*sockets: HeldSocket):
        attempts = EscapeAttempts(_attempt(None, EPERM, KILLED), (), {}, True, sockets=sockets)
        return judge_escape(ProbeReport(own_ns, {}, None, escape=attempts), SPACES)

    assert judged(HeldSocket(3, "tcp", "unconnected", netns=HOST)).verdict is Verdict.ALLOWED
    assert judged(HeldSocket(3, "udp", "connected", here=False)).verdict is Verdict.ALLOWED  # UDP reconnects
    assert judged(HeldSocket(3, "tcp", "unconnected", netns=own_ns)).verdict is Verdict.BLOCKED
    assert judged(HeldSocket(3, "tcp", "unconnected", here=True)).verdict is Verdict.BLOCKED
    assert judged(HeldSocket(3, "tcp", "connected", netns=HOST)).verdict is Verdict.BLOCKED
    assert judged(HeldSocket(3, "tcp", "listening", netns=HOST)).verdict is Verdict.BLOCKED
    unknown = judged(HeldSocket(3, "udp", "unconnected"))
    assert unknown.verdict is Verdict.INDETERMINATE and "could not tell" in unknown.reason


# --- a real runtime: firejail (runc: tests/test_runc.py) --------------------------------------------------------

needs_firejail = pytest.mark.skipif(shutil.which("firejail") is None, reason="firejail is not installed")


@needs_firejail
def test_firejail_default_profile_with_net_none_blocks_the_way_back(probe_launcher):
    # its default profile drops every capability and refuses setns (seccomp), on both ABIs
    evidence = probe_launcher("firejail --quiet --net=none --")
    if evidence.report.error:
        pytest.skip(f"firejail cannot start here: {evidence.report.error}")
    verdicts = evidence.verdicts()
    assert verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts


@needs_firejail
def test_firejail_without_a_profile_keeps_setns_and_is_not_shown_isolated(probe_launcher):
    # --noprofile as root: CAP_SYS_ADMIN kept, no filter; its own PID namespace hides every other namespace, but
    # root could unmount that /proc, so the row is INDETERMINATE, never a pass
    evidence = probe_launcher("firejail --quiet --noprofile --net=none --")
    if evidence.report.error:
        pytest.skip(f"firejail cannot start here: {evidence.report.error}")
    assert evidence.escape.verdict is Verdict.INDETERMINATE, evidence.escape
    assert "setns(2) works" in evidence.escape.reason


# --- no /proc and no CAP_NET_ADMIN: no handle on its own namespace, its identity unknown -------------------------

NO_HANDLE, REACHED = SetnsResult("nofd", errno.EPERM), SetnsResult("nofd", errno.EBADF)


@pytest.mark.parametrize(("native", "i386", "cap", "verdict", "reason"), [
    (NO_HANDLE, NO_HANDLE, None, Verdict.BLOCKED, "refused every way"),  # setns(-1): EPERM is the filter's
    (NO_HANDLE, KILLED, True, Verdict.BLOCKED, "refused every way"),
    (REACHED, NO_HANDLE, False, Verdict.BLOCKED, "CAP_SYS_ADMIN is not"),  # the kernel refuses it without the cap
    (REACHED, REACHED, False, Verdict.BLOCKED, "CAP_SYS_ADMIN is not"),
    (NO_HANDLE, REACHED, True, Verdict.INDETERMINATE, "CAP_SYS_ADMIN in its effective set"),
    (REACHED, REACHED, None, Verdict.INDETERMINATE, "CAP_SYS_ADMIN unknown"),
])
def test_the_escape_judge_without_a_handle_on_its_own_namespace(native, i386, cap, verdict, reason):
    attempts = EscapeAttempts(EscapeAttempt(None, None, native, i386), (), {}, False, cap_sys_admin=cap)
    judgement = judge_escape(ProbeReport(None, {}, None, interfaces=(("lo", True),), escape=attempts), SPACES)
    assert judgement.verdict is verdict and reason in judgement.reason, judgement


def test_an_unknown_namespace_with_only_loopbacks_is_isolated_only_if_no_namespace_of_the_harness_is():
    def isolated(host_loopback_only: bool | None, interfaces=(("lo", True),), stand_in=STAND_IN) -> bool:
        spaces = Namespaces(host=HOST, lab=LAB, own=None, stand_in=stand_in, host_loopback_only=host_loopback_only)
        return spaces.isolated(ProbeReport(None, {}, None, interfaces=interfaces))

    assert isolated(False)
    assert not isolated(True)  # a loopback-only host: the process could be in it
    assert not isolated(None)  # not looked at
    assert not isolated(False, interfaces=(("lo", True), ("standin-own", False)))
    assert not isolated(False, interfaces=None)
    assert not Namespaces(host=HOST, lab=LAB, own=LAUNCHERS, host_loopback_only=False).isolated(
        ProbeReport(None, {}, None, interfaces=(("lo", True),)))  # the reference: only the namespace made for it


MINIMAL_BWRAP = "bwrap --ro-bind /usr /usr --symlink usr/lib64 /lib64 --symlink usr/bin /bin --symlink usr/lib /lib " \
                "--dev /dev"  # no /proc: the process cannot read /proc/self/ns/net


@needs_bwrap
def test_a_minimal_sandbox_without_proc_is_judged_by_what_it_holds(probe_launcher):
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the minimal sandbox binds /usr only: it needs /usr/bin/python3")
    isolated = probe_launcher(f"{MINIMAL_BWRAP} --unshare-net --cap-drop ALL --")
    assert isolated.report.netns is None and isolated.report.escape is not None and not isolated.report.escape.proc
    verdicts = isolated.verdicts()
    assert verdicts.pop("loopback-control") is Verdict.WORKS
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts
    assert "CAP_SYS_ADMIN is not" in isolated.escape.reason and "identity unknown" in isolated.namespace.reason
    # the same sandbox left in the stand-in (no --unshare-net): its veth shows, the host's loopback listeners see it
    shared = probe_launcher(f"{MINIMAL_BWRAP} --cap-drop ALL --")
    assert shared.namespace.verdict is Verdict.INDETERMINATE and "standin-own" in shared.namespace.observed
    assert {shared.verdicts()[f"direct-{kind}host-loopback-v4"] for kind in ("", "udp-")} == {Verdict.ALLOWED}
    # root keeps CAP_SYS_ADMIN (and CAP_NET_ADMIN, so SIOCGSKNS names its namespace): with no /proc to look in for
    # other namespaces, its way back is not shown closed
    rooted = probe_launcher(f"{MINIMAL_BWRAP} --unshare-net --")
    assert rooted.namespace.verdict is Verdict.BLOCKED and rooted.report.netns is not None
    assert rooted.escape.verdict is Verdict.INDETERMINATE and "without /proc" in rooted.escape.reason


@needs_bwrap
def test_without_a_handle_one_way_that_reaches_the_kernel_is_enough_to_withhold_blocked(probe_launcher, tmp_path):
    # No /proc and no CAP_NET_ADMIN (no handle on its own namespace), CAP_SYS_ADMIN kept, and a filter that refuses
    # nstype CLONE_NEWNET (and so the high-bits way) but lets nstype 0 through: setns(-1, 0) answers EBADF between
    # two refusals, and the kernel would take setns(fd, 0) from a process holding any handle
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the minimal sandbox binds /usr only: it needs /usr/bin/python3")
    program = tmp_path / "masked.bpf"
    program.write_bytes(BROKEN_FILTERS["nstype-newnet-masked"])
    script = tmp_path / "minimal-masked"
    script.write_text(f'#!/bin/sh\nexec 3<{program}\nexec {MINIMAL_BWRAP} --unshare-net --cap-drop ALL --cap-add '
                      'CAP_SYS_ADMIN --add-seccomp-fd 3 -- "$@"\n')
    script.chmod(0o755)
    evidence = probe_launcher(str(script))
    assert evidence.report.escape is not None and evidence.report.escape.cap_sys_admin is True, evidence.escape
    assert evidence.escape.verdict is Verdict.INDETERMINATE, evidence.escape
    assert "EBADF" in evidence.escape.reason and "CAP_SYS_ADMIN in its effective set" in evidence.escape.reason


# --- a launcher that only clears the effective capability set ---------------------------------------------------

EFFECTIVE_ONLY_LAUNCHER = '''#!{python}
"""A network namespace of its own with lo up, then the effective capability set cleared (the permitted set kept), and
the program on stdin run in this very process (no execve, which would recompute the sets)."""
import ctypes, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
    sys.exit("unshare: errno %d" % ctypes.get_errno())
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
libc.syscall(125, header, data)  # capget
data[0] = data[3] = 0  # effective: nothing; permitted: as it was
libc.syscall(126, header, data)  # capset
source = sys.stdin.read()
sys.argv = ["-"]
exec(compile(source, "<stdin>", "exec"), {{"__name__": "__main__"}})
'''


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip")
def test_a_launcher_that_clears_only_the_effective_set_has_dropped_nothing(probe_launcher, tmp_path):
    # setns(2) checks the effective set, so the probe's first call is refused; capset(2) raises it from the permitted
    # set, and then setns leads into the host's namespace
    script = tmp_path / "effective-only"
    script.write_text(EFFECTIVE_ONLY_LAUNCHER.format(python=sys.executable))
    script.chmod(0o755)
    evidence = probe_launcher(str(script))
    assert evidence.namespace.verdict is Verdict.BLOCKED, evidence.namespace
    assert evidence.escape.verdict is Verdict.ALLOWED and "the host's" in evidence.escape.reason, evidence.escape
