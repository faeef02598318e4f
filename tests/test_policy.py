"""Policy parsing: the bundled policies, and every error path names the file, the field and the fix."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.load import BUNDLED_POLICIES, baseline_routes, bundled_policy_path, load_policy
from pytest_sandbox.policy.model import SOCKET_FAMILIES, ArgRule, NetworkPolicy, host_admitted

ADDED_BY_819 = {
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "setns", "umount2", "pivot_root", "userfaultfd", "perf_event_open",
}  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_baseline_has_the_21_unconditional_denies_of_pr_819():
    policy = load_policy("baseline")
    assert len(policy.seccomp.deny) == 21
    assert ADDED_BY_819 <= set(policy.seccomp.deny)
    assert policy.seccomp.enosys == ("clone3",)
    assert {r.syscall for r in policy.seccomp.arg_rules} == {"execveat", "unshare", "clone", "seccomp"}
    assert policy.seccomp.bad_arch_action == "kill_process"


def test_baseline_socket_domains_follow_the_network_mode():
    network = load_policy("baseline").network
    always = {SOCKET_FAMILIES[f] for f in ("AF_PACKET", "AF_BLUETOOTH", "AF_VSOCK")}
    assert set(network.blocked_domains("proxy")) == always
    assert set(network.blocked_domains("allow")) == always
    assert set(network.blocked_domains("block")) == always | {2, 10, 16}


def test_pre_819_fixture_lacks_exactly_the_15_syscalls_and_the_clone_rule():
    baseline, weak = load_policy("baseline"), load_policy("openshell-pre-819")
    assert set(baseline.seccomp.deny) - set(weak.seccomp.deny) == ADDED_BY_819
    assert "clone" not in {r.syscall for r in weak.seccomp.arg_rules}
    assert weak.seccomp.enosys == ()
    assert not weak.filter_applies("allow")


def test_strict_extends_baseline():
    strict, baseline = load_policy("strict"), load_policy("baseline")
    assert set(baseline.seccomp.deny) < set(strict.seccomp.deny)
    assert {"io_uring_enter", "keyctl", "kexec_load", "open_by_handle_at"} <= set(strict.seccomp.deny)
    assert set(baseline.seccomp.arg_rules) <= set(strict.seccomp.arg_rules)


FIXTURE_POLICIES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"


@pytest.mark.parametrize("name", BUNDLED_POLICIES)
def test_each_fixture_policy_is_a_link_to_the_one_bundled_copy(name):
    """One copy of each bundled policy (in the package); ``fixtures/policies/`` only links to it."""
    path = FIXTURE_POLICIES / f"{name}.toml"
    assert path.is_symlink(), f"{path} must be a symlink to the bundled policy, not a second copy"
    assert path.resolve() == bundled_policy_path(name).resolve()
    assert load_policy(path) == load_policy(name)


def test_fixture_policies_hold_no_toml_file_of_their_own():
    copies = [p.name for p in FIXTURE_POLICIES.glob("*.toml") if not p.is_symlink()]
    assert not copies, f"copies of policies in {FIXTURE_POLICIES} (link to pytest_sandbox/policy/bundled/): {copies}"
    assert sorted(p.stem for p in FIXTURE_POLICIES.glob("*.toml")) == sorted(BUNDLED_POLICIES)


@pytest.mark.parametrize(("host", "patterns", "admitted"), [
    ("api.example.com", ("*.example.com",), True),
    ("API.Example.COM", ("*.example.com",), True),  # the proxy's canonical host is lowercase; so is the check
    ("api.example.com", ("*.EXAMPLE.com",), True),
    ("example.com", ("*.example.com",), False),
    ("evil.com", ("*.example.com", "good.org"), False),
    ("good.org", ("*.example.com", "good.org"), True),
    ("anything", (), False),
    ("anything", ("*",), True),
])  # fmt: skip
def test_host_admitted_is_fnmatch_on_lowercase_host_and_pattern(host, patterns, admitted):
    assert host_admitted(host, patterns) is admitted
    policy = NetworkPolicy(allowed_hosts=patterns, allowed_ports=(443,))
    assert policy.admits(host, 443) is admitted
    assert not policy.admits(host, 80)


def test_baseline_routes_are_the_bundled_baselines():
    assert baseline_routes() == load_policy("baseline").inference_routes and len(baseline_routes()) == 7


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[seccomp]\ndeny = ["ptrac"]', ["seccomp.deny[0]", "unknown syscall 'ptrac'", "did you mean 'ptrace'"]),
        ('[seccomp]\ndeny = ["nonexistent_call"]', ["unknown syscall 'nonexistent_call'"]),
        ('[seccomp]\nenosys = ["socketcall"]', ["unknown syscall 'socketcall'"]),  # multiplexed: negative nr
        ('[seccomp]\ndenny = ["ptrace"]', ["seccomp.denny", "unknown key", "did you mean 'deny'"]),
        ('colour = "red"', ["colour", "unknown key"]),
        ('[seccomp]\nerrno = 0', ["seccomp.errno", "errno 0 makes a denied call look successful"]),
        ('[seccomp]\nerrno = "EWHAT"', ["seccomp.errno", "unknown errno name"]),
        ('[seccomp]\nerrno = 5000', ["seccomp.errno", "out of range"]),
        ('[seccomp]\ndefault_errno = 4095', ["seccomp.default_errno", "libseccomp refuses errno 4095", "1..4094"]),
        ('[seccomp]\nbad_arch_action = "allow"', ["seccomp.bad_arch_action", "kill_process"]),
        ('[seccomp]\ndefault_action = "maybe"', ["seccomp.default_action", "not one of"]),
        ('[[seccomp.arg_rules]]\nsyscall = "clone"\narg = 6\nop = "eq"\nvalue = 1',
         ["seccomp.arg_rules[0].arg", "0..5"]),
        ('[[seccomp.arg_rules]]\nsyscall = "clone"\narg = 0\nop = "like"\nvalue = 1',
         ["seccomp.arg_rules[0].op", "not one of"]),
        ('[[seccomp.arg_rules]]\nsyscall = "clone"\narg = 0\nop = "eq"', ["seccomp.arg_rules[0]", "missing 'value'"]),
        ('[[seccomp.arg_rules]]\nsyscall = "clone"\narg = 0\nop = "masked_eq"\nmask = 1\nvalue = 2',
         ["seccomp.arg_rules[0].value", "outside mask"]),
        ('[[seccomp.arg_rules]]\nsyscall = "clone"\narg = 0\nop = "eq"\nvalue = 0x100000000',
         ["exceeds 32 bits"]),
        ('[network]\nmode = "open"', ["network.mode", "block, proxy, allow"]),
        ('[network.socket_domains]\nblock = ["AF_INETT"]', ["unknown address family", "did you mean 'AF_INET'"]),
        ('[network]\nallowed_ports = [0]', ["network.allowed_ports[0]", "1..65535"]),
        ('[seccomp]\ndeny = ["clone3"]\nenosys = ["clone3"]', ["also listed in seccomp.deny"]),
        ("[seccomp\n", ["not valid TOML"]),
        ('[[inference.routes]]\nmethod = "POST"\npath = "v1/chat"', ["inference.routes[0].path", "must start"]),
    ],
)
def test_malformed_policy_gets_one_readable_error_naming_file_and_field(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_policy_names_the_bundled_alternatives():
    with pytest.raises(PolicyError, match="bundled names baseline"):
        load_policy("no-such-policy")


def test_errno_by_name_and_number(tmp_path):
    policy = load_policy(write(tmp_path, '[seccomp]\nerrno = "EACCES"\ndeny = ["ptrace"]'))
    assert policy.seccomp.errno == errno.EACCES
    assert load_policy(write(tmp_path, "[seccomp]\nerrno = 1000")).seccomp.errno == 1000


def test_eq_rules_compare_only_the_low_32_bits():
    rule = ArgRule("socket", 0, "eq", 2)
    assert rule.matches((2,)) and rule.matches(((1 << 32) | 2,)) and not rule.matches((3,))
    flag = ArgRule("clone", 0, "masked_eq", 0x10000000, mask=0x10000000)
    assert flag.matches((0x10020211,)) and flag.matches((0xFFFFFFFF << 32 | 0x10000000,))
    assert not flag.matches((0x20211,))
