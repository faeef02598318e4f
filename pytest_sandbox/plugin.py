"""pytest entry point: options, fixtures and hooks only; everything else lives in the package.

The fixtures, and the hooks that parametrize and set tests up, are one more plugin (``fixtures/registry.py``)
registered at session start, except in an xdist controller, which sets none up; the hooks here import what
they use from ``fixtures/`` only where it runs. The run's
state is in ``config.stash`` under the keys of ``fixtures/stash.py``; the scorecard's counting, printing and
report writing is ``report/terminal.py``.

Inert unless ``--sandbox`` is given (the plugin is registered for every pytest run via the
``pytest11`` entry point, so it must cost nothing when unused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.fixtures.rewriting import leave_unrewritten

leave_unrewritten("pytest_sandbox")  # before the package's other modules are imported: fixtures/rewriting.py

from pytest_sandbox.errors import SandboxError  # noqa: E402
from pytest_sandbox.fixtures.heap import freeze_long_lived, thaw_at_exit  # noqa: E402
from pytest_sandbox.fixtures.run_order import tail_order  # noqa: E402
from pytest_sandbox.fixtures.stash import SCORECARD_KEY, SESSION_KEY, UNRUNNABLE_KEY  # noqa: E402
from pytest_sandbox.report.categories import (  # noqa: E402
    CATEGORIES,
    PROBE_RUN_CATEGORIES,
    SUITE_DIRECTORY,
    CategoryNotRun,
    LateEvidence,
    category_of,
    marker_name,
)
from pytest_sandbox.report.scorecard import LATE_EVIDENCE_PROPERTY, NOT_RUN_PROPERTY, Scorecard  # noqa: E402
from pytest_sandbox.report.terminal import ScorecardReporter, runs_no_test  # noqa: E402
from pytest_sandbox.session import WATCH_AFTER_DEFAULT_SECONDS, SandboxOptions, SandboxSession  # noqa: E402

# At exit, how long to wait for probe runs still going (each run's own wait is bounded by its target).
PREFETCH_JOIN_SECONDS = 60.0
# The name the fixtures' plugin (``fixtures/registry.py``) is registered under.
FIXTURES_PLUGIN = "sandbox-fixtures"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest-sandbox: prove a sandbox blocks what it claims")
    group.addoption("--sandbox", action="store_true", help="enable the sandbox plugin and conformance suite")
    group.addoption("--sandbox-policy", default="baseline", metavar="FILE|NAME",
                    help="policy the reference sandbox enforces (bundled: baseline, strict, openshell-pre-819)")
    group.addoption("--sandbox-require", default=None, metavar="FILE|NAME",
                    help="minimum set that must be proven blocked (default: the policy's own denies + baseline)")
    group.addoption("--sandbox-exec", default=None, metavar="PREFIX",
                    help="run syscall probes inside a third-party launcher: PREFIX python3 -S -")
    group.addoption("--sandbox-proxy-cmd", default=None, metavar="'CMD {port}'",
                    help="run the network categories against a third-party proxy started inside the lab "
                         "namespace by this command; {port} is replaced by the port it must listen on and "
                         "{address} by the address (127.0.0.1; the self-connection cases also start it on a "
                         "lab public address and on 0.0.0.0)")
    group.addoption("--sandbox-proxy", default=None, metavar="URL",
                    help="run the network categories against a proxy already listening at URL inside the lab")
    group.addoption("--sandbox-proxy-ca", default=None, metavar="FILE",
                    help="PEM of the CA the third-party proxy intercepts inference.local with (read once it "
                         "listens); its command gets the fake inference backend as {backend} (HOST:PORT), "
                         "{backend_name}, {backend_ca}, {backend_key} and the PYTEST_SANDBOX_BACKEND* variables. "
                         "Without it the inference and tunnel-smuggling tests of a third party do not run")
    group.addoption("--sandbox-backend-ca", default=None, metavar="FILE",
                    help="PEM CA (certificate and key) that signs the fake inference backend's certificate, so a "
                         "third-party proxy (--sandbox-proxy URL) can trust it before the session starts; the backend "
                         "is always 11.0.0.20:443 in the lab, named api.inference.test, route key "
                         "route-key-lab-backend-only. Make one with 'python -m pytest_sandbox.network.third_party "
                         "backend-ca DIR'")
    group.addoption("--sandbox-report", default=None, metavar="PATH",
                    help="write the scorecard and every probe's evidence to PATH (.json or .md)")
    group.addoption("--sandbox-modes", default="block,proxy,allow", metavar="MODES",
                    help="network modes to run the syscall category under (comma-separated)")
    group.addoption("--sandbox-caps", default="docker-default", metavar="SET|CAPS",
                    help="capability set resolving an OCI profile's includes/excludes.caps: docker-default "
                         "(default), none, all, or a comma list of CAP_* names")
    group.addoption("--sandbox-identities", default="current,nobody", metavar="IDS",
                    help="who probes run as: current and/or nobody (uid 65534; needs root)")
    group.addoption("--sandbox-watch-after", default=WATCH_AFTER_DEFAULT_SECONDS, type=float, metavar="SECONDS",
                    help=f"keep the proxy under test running and the lab watched this long after the last test "
                         f"before the session-end audit (default {WATCH_AFTER_DEFAULT_SECONDS}); a dial or forward it "
                         "makes later than that is seen by nothing, so a certification run should watch longer")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox_policy(name_or_path): run this test's sandbox under another policy")
    for category in CATEGORIES:
        config.addinivalue_line("markers", f"{marker_name(category)}: conformance tests of the {category} category "
                                           "(set by pytest-sandbox; deselect with -m)")
    config.stash[SCORECARD_KEY] = Scorecard()
    config.stash[UNRUNNABLE_KEY] = {}
    if not config.getoption("sandbox"):
        return
    thaw_at_exit(config)  # registered here, before the built-in plugins' cleanups: see fixtures/heap.py
    options = SandboxOptions(
        policy=config.getoption("sandbox_policy"),
        require=config.getoption("sandbox_require"),
        exec_prefix=config.getoption("sandbox_exec"),
        proxy_cmd=config.getoption("sandbox_proxy_cmd"),
        proxy_url=config.getoption("sandbox_proxy"),
        proxy_ca=config.getoption("sandbox_proxy_ca"),
        backend_ca=config.getoption("sandbox_backend_ca"),
        modes=tuple(m.strip() for m in config.getoption("sandbox_modes").split(",") if m.strip()),
        identities=tuple(i.strip() for i in config.getoption("sandbox_identities").split(",") if i.strip()),
        caps=config.getoption("sandbox_caps"),
        watch_after=config.getoption("sandbox_watch_after"),
    )
    report_path = config.getoption("sandbox_report")
    if report_path is not None and Path(report_path).suffix not in (".json", ".md", ".markdown"):
        raise pytest.UsageError(f"pytest-sandbox: --sandbox-report {report_path}: use a .json or .md path")
    if report_path is not None and not os.access(Path(report_path).absolute().parent, os.W_OK | os.X_OK):
        # checked now, not after the whole run: the directory must exist and be writable
        raise pytest.UsageError(f"pytest-sandbox: --sandbox-report {report_path}: directory "
                                f"{Path(report_path).absolute().parent} does not exist or is not writable; "
                                "create it first or give another path")
    try:
        config.stash[SESSION_KEY] = SandboxSession(options)
    except SandboxError as exc:
        raise pytest.UsageError(f"pytest-sandbox: {exc}") from None
    reporter = ScorecardReporter(config.stash[SCORECARD_KEY], options, Path(report_path) if report_path else None)
    config.pluginmanager.register(reporter, "sandbox-scorecard")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each conformance test with its category, before ``-m`` deselects (hence tryfirst); run the modules
    that send nothing through the proxy after the last that does, and the after-quiet exchanges last
    (``probes/after_quiet.py``)."""
    if SESSION_KEY not in config.stash:
        return
    items[:] = [items[index] for index in tail_order([item.nodeid for item in items], SUITE_DIRECTORY)]
    for item in items:
        category = category_of(item.nodeid)
        if category is not None:
            item.add_marker(marker_name(category))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``: hand the modules out biggest first and the after-quiet tail last, the two modules
    that read the probe runs as one unit (``fixtures/distribution.py``); any other mode is xdist's own."""
    if SESSION_KEY not in config.stash or config.getoption("dist", None) != "loadfile":
        return None
    from pytest_sandbox.fixtures.distribution import SuiteFileScheduling  # xdist's scheduler: only when asked for
    return SuiteFileScheduling(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Register the fixtures where they can be set up or are listed (not in an xdist controller); an xdist
    controller collects no tests: keep the collector off the plugin's modules now (workers and serial runs
    freeze once, after collection)."""
    config = session.config
    controller = config.pluginmanager.has_plugin("dsession")
    if not controller or config.option.showfixtures or config.option.show_fixtures_per_test:
        register_fixtures(config)
    if SESSION_KEY in config.stash and controller:
        freeze_long_lived()


def register_fixtures(config: pytest.Config) -> None:
    """The plugin's fixtures and the hooks that set tests up (``fixtures/registry.py``)."""
    from pytest_sandbox.fixtures import registry

    config.pluginmanager.register(registry, FIXTURES_PLUGIN)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep the collector off the collected tests (``fixtures/heap.py``); selected syscall tests: start the
    reference's probe runs now, beside the tests before them (not in an xdist worker, which may be given none
    of them)."""
    running = session.config.stash.get(SESSION_KEY, None)
    if running is None or runs_no_test(session.config):
        return
    freeze_long_lived()
    if hasattr(session.config, "workerinput"):
        return
    if any(category_of(item.nodeid) in PROBE_RUN_CATEGORIES for item in session.items):
        running.prefetch()


def pytest_sessionfinish(session: pytest.Session) -> None:
    running = session.config.stash.get(SESSION_KEY, None)
    if running is not None:
        running.finish_prefetch(PREFETCH_JOIN_SECONDS)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep pytest's final collections off what the session made (its reports, the campaigns' verdicts)."""
    if SESSION_KEY in config.stash:
        freeze_long_lived()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A test whose category cannot run tells the scorecard why, and so does the lab's session-end audit when it
    found late evidence (the report travels to the xdist controller)."""
    report: pytest.TestReport = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, CategoryNotRun):
        report.user_properties.append((NOT_RUN_PROPERTY, call.excinfo.value.reason))
    if call.excinfo is not None and isinstance(call.excinfo.value, LateEvidence):
        report.user_properties.append((LATE_EVIDENCE_PROPERTY, call.excinfo.value.message))
    return report
