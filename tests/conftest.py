"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.lab.wired import unwire_from_lab, wire_into_lab
from pytest_sandbox.network.netns import NetnsHolder
from pytest_sandbox.probes.egress import EgressEvidence, StandInLauncher, run_egress_probe
from pytest_sandbox.probes.syscall import ExecTarget

pytest_plugins = ["pytester"]


@pytest.fixture
def probe_launcher(_network_lab: NetworkLab) -> Iterator[Callable[[str], EgressEvidence]]:
    """``probe_launcher(prefix)``: the egress evidence of ``prefix`` started in a fresh stand-in."""
    holders: list[NetnsHolder] = []

    def probe(prefix: str) -> EgressEvidence:
        stand_in = NetnsHolder.start(name="egress-stand-in")
        holders.append(stand_in)
        wire_into_lab(stand_in, _network_lab, link="standin")
        return run_egress_probe(StandInLauncher(ExecTarget(prefix), stand_in), _network_lab, None, proxy=None,
                                stand_in=stand_in)

    yield probe
    unwire_from_lab(_network_lab, link="standin")
    for holder in holders:
        holder.close()
