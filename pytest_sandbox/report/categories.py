"""The conformance suite's categories: which test reports which category, and how one says it cannot run.

SPEC "Fail closed": a selected category that cannot run on this host fails the session with the
reason; it is never skipped into a green run. So the scorecard lists *every* category, with counts,
``not run: <reason>`` or ``not selected`` (the user left it out, by file, ``-k`` or
``-m "not sandbox_ssrf"``).

Which category a test belongs to is decided from its node id alone (:func:`category_of`): the
pytest-xdist controller sees node ids, never items, and it is the one that prints the scorecard.
The table is data, checked against the categories the tests actually report by
``tests/test_fail_closed.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from _pytest.outcomes import Failed  # pytest.fail.Exception, importable under a name mypy can check

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES

__all__ = [
    "CATEGORIES",
    "LAB_CATEGORIES",
    "MEMBERSHIP",
    "PROBE_RUN_CATEGORIES",
    "PROBE_RUN_MODULES",
    "CategoryNotRun",
    "category_of",
    "marker_name",
    "suite_module",
]


@dataclass(frozen=True)
class Membership:
    """Tests of ``module`` (a file in a ``conformance`` directory) whose function matches ``function``
    and whose parameter id matches ``params`` (fnmatch patterns; a frozenset is a set of exact ids) report
    ``category``."""

    module: str
    function: str
    params: str | frozenset[str]
    category: str

    def matches(self, module: str, function: str, params: str) -> bool:
        if module != self.module or not fnmatch.fnmatchcase(function, self.function):
            return False
        if isinstance(self.params, frozenset):
            return params in self.params
        return fnmatch.fnmatchcase(params, self.params)


_SSRF_CASE_TEST = "test_special_use_destination_is_refused_and_public_one_is_reached"
# Ambiguous corpus inputs no client sends (the catalogue's ``malformed`` cases: inet_aton forms, userinfo,
# bad ports, zone ids, non-ASCII), in every form they are sent in (test ids ``<form>-<case id>``): refused
# as malformed before any lookup, counted apart from the policy's semantic refusals of real destinations.
SSRF_MALFORMED_IDS: frozenset[str] = frozenset(
    f"{form}-{case.case_id}" for case in SSRF_CASES if case.expected == "malformed" for form in case.forms)


# First match wins. The conformance modules are the suite's (conformance/ in a checkout,
# pytest_sandbox/conformance/ when installed): a test file elsewhere never belongs to a category.
MEMBERSHIP: tuple[Membership, ...] = (
    Membership("test_syscalls.py", "test_forbidden_syscall_is_refused", "*", "syscall"),
    Membership("test_syscalls.py", "test_ordinary_work_still_functions", "*", "syscall-controls"),
    Membership("test_loaded_filter.py", "*", "*", "syscall-evaluation"),
    Membership("test_ssrf.py", _SSRF_CASE_TEST, "*-ctl-*", "ssrf-controls"),
    Membership("test_ssrf.py", _SSRF_CASE_TEST, SSRF_MALFORMED_IDS, "ssrf-malformed"),
    Membership("test_ssrf.py", "test_absolute_request_with_private_host_header_is_judged_by_its_public_target",
               "*", "ssrf-controls"),
    Membership("test_ssrf.py", "*", "*", "ssrf"),
    Membership("test_ssrf_self.py", "test_instance_for_self_cases_is_a_working_proxy", "*", "ssrf-controls"),
    Membership("test_ssrf_self.py", "*", "*", "ssrf"),
    Membership("test_allowlist.py", "*", "*", "allowlist"),
    Membership("test_egress.py", "*", "*", "egress"),
    Membership("test_inference.py", "*", "*", "inference"),
    Membership("test_smuggling.py", "*", "*", "smuggling"),
    Membership("test_after_quiet.py", "*", "*", "ssrf"),
)

# Every category, in scorecard order (each control category after what it controls).
CATEGORIES: tuple[str, ...] = ("syscall", "syscall-controls", "syscall-evaluation", "ssrf", "ssrf-malformed",
                               "ssrf-controls",
                               "allowlist", "egress", "inference", "smuggling")

# The categories whose evidence is what the network lab saw: bounded by the session-end audit's watch
# (--sandbox-watch-after), which the scorecard states when one of them ran.
LAB_CATEGORIES = frozenset({"ssrf", "ssrf-malformed", "ssrf-controls", "allowlist", "egress", "inference", "smuggling"})

# What a category judges: the launcher's categories judge the --sandbox-exec launcher when one is given (else the
# reference sandbox), the rest the third-party proxy when one is given (else the reference egress proxy). A third
# party that names only its launcher gets proxy rows about pytest-sandbox's own proxy: the scorecard says so.
LAUNCHER_CATEGORIES = frozenset({"syscall", "syscall-controls", "syscall-evaluation", "egress"})


def judged_target(category: str, *, policy: str, exec_prefix: str | None = None, proxy_cmd: str | None = None,
                  proxy_url: str | None = None) -> str:
    """Who ``category``'s verdicts are about, in words (the options as the run was given them)."""
    if category in LAUNCHER_CATEGORIES:
        if exec_prefix is not None:
            return f"the launcher --sandbox-exec '{exec_prefix}'"
        return f"the reference sandbox (policy {policy})"
    if proxy_cmd is not None:
        return f"the proxy --sandbox-proxy-cmd '{proxy_cmd}'"
    if proxy_url is not None:
        return f"the proxy at {proxy_url}"
    return (f"the reference egress proxy (policy {policy}; --sandbox-proxy or --sandbox-proxy-cmd judges another)"
            if exec_prefix is not None else f"the reference egress proxy (policy {policy})")


SUITE_DIRECTORY = "conformance"

# The categories whose tests read the session's syscall probe runs (SandboxSession.outcomes: every build of each mode
# and identity a test touches), and the suite modules that hold them.
PROBE_RUN_CATEGORIES = frozenset({"syscall", "syscall-controls", "syscall-evaluation"})
PROBE_RUN_MODULES: tuple[str, ...] = tuple(dict.fromkeys(member.module for member in MEMBERSHIP
                                                         if member.category in PROBE_RUN_CATEGORIES))


def category_of(nodeid: str) -> str | None:
    """The category a conformance test reports, from its node id; None for any other test. Pure.

    ``conformance/test_ssrf.py::test_x[connect-ctl-v4-...]`` -> ``ssrf-controls``.
    """
    module = suite_module(nodeid)
    if module is None:
        return None
    function, _, params = nodeid.partition("::")[2].partition("[")
    params = params[:-1] if params.endswith("]") else params
    for member in MEMBERSHIP:
        if member.matches(module, function, params):
            return member.category
    return None


def suite_module(nodeid: str, suite_directory: str = SUITE_DIRECTORY) -> str | None:
    """The file name of the test file a node id (or path) names when that file is in ``suite_directory``,
    else None. Pure. ``conformance/test_ssrf.py::test_x[...]`` -> ``test_ssrf.py``."""
    parts = nodeid.partition("::")[0].replace("\\", "/").split("/")
    if len(parts) < 2 or parts[-2] != suite_directory:
        return None
    return parts[-1]


def marker_name(category: str) -> str:
    """The marker the plugin puts on a category's tests: ``-m "not sandbox_ssrf_controls"``."""
    return "sandbox_" + category.replace("-", "_")


class CategoryNotRun(Failed):
    """Raised by a fixture or test whose category cannot run here (no network namespace, no seccomp,
    a policy that leaves nothing for the test to prove): the test fails showing ``reason`` alone
    (``pytest.fail(..., pytrace=False)``), and the scorecard shows ``not run: <reason>``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"pytest-sandbox: not run: {reason}", pytrace=False)
        self.reason = reason


class LateEvidence(Failed):
    """Raised at the session's end when the lab holds evidence no verdict saw (a dial or forwarded bytes after
    the verdict of the attempt that caused them): the run fails showing ``message`` alone, and the scorecard
    and the report say that their verdict counts do not include it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, pytrace=False)
        self.message = message


assert set(CATEGORIES) == {m.category for m in MEMBERSHIP}, "every category has members and a scorecard place"
assert LAB_CATEGORIES <= set(CATEGORIES), "every lab category is a category"
