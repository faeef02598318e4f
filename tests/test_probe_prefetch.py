"""The reference's probe runs start at collection finish, beside the tests before them (session.prefetch).

Nothing may be judged differently: the runs are the ones a first test would have made, made once, and a run
that cannot be made is reported to every test of its (mode, identity) exactly as without the prefetch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pytest_sandbox.errors import SandboxError
from pytest_sandbox.seccomp.launcher import Identity
from pytest_sandbox.session import SandboxOptions, SandboxSession

PREFETCH_WAIT_SECONDS = 120.0


def test_prefetch_makes_every_build_once_and_the_tests_read_those_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))
    runs: list[tuple[str, str, str]] = []
    run = session._run

    def counted(mode: str, identity: Identity, build: str, witness):  # type: ignore[no-untyped-def]
        runs.append((mode, identity.name, build))
        return run(mode, identity, build, witness)
    monkeypatch.setattr(session, "_run", counted)
    session.prefetch()
    session.prefetch()  # a second call starts nothing
    session.finish_prefetch(PREFETCH_WAIT_SECONDS)
    assert sorted(runs) == sorted(("block", Identity.current().name, build) for build in session.builds())
    # The tests' reads come from those runs: no launch, the same outcomes object.
    real = session.outcomes("block", Identity.current(), "real")
    assert real and all(outcome is not None for outcome in real.values())
    assert len(runs) == len(session.builds())


def test_a_run_that_cannot_be_made_is_reported_to_the_tests_as_without_prefetch(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))

    def refused(mode: str, identity: Identity) -> None:
        raise SandboxError("no seccomp on this host (simulated)")
    monkeypatch.setattr(session, "_run_builds", refused)
    session.prefetch()
    session.finish_prefetch(PREFETCH_WAIT_SECONDS)
    for build in session.builds():
        with pytest.raises(SandboxError, match="simulated"):
            session.outcomes("block", Identity.current(), build)


def test_a_third_party_session_is_not_prefetched() -> None:
    """A third party's baseline is taken as the caller its runner shows (session.py): its runs wait for
    the tests. (The options are swapped after construction: the pre-flight needs a real launcher.)"""
    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))
    session.options = replace(session.options, exec_prefix="launcher-that-is-never-run")
    assert session.third_party
    session.prefetch()
    assert session._prefetch is None
