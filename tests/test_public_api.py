"""The package's public API: every advertised name resolves, and importing the package imports nothing.

The lab's namespace helper and the unprivileged probe runs import single modules of this package with
only the standard library (plus h11 or pyseccomp) available, so ``import pytest_sandbox`` itself must
not pull in pytest, h11, trustme or pyseccomp.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import pytest_sandbox


@pytest.mark.parametrize("name", pytest_sandbox.__all__)
def test_every_public_name_resolves_to_an_object_of_that_name(name):
    value = getattr(pytest_sandbox, name)
    assert getattr(value, "__name__", name) == name


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no_such_thing"):
        pytest_sandbox.no_such_thing  # noqa: B018


def test_importing_the_package_imports_no_third_party_module():
    code = ("import sys, pytest_sandbox; heavy = {'pytest', 'h11', 'trustme', 'pyseccomp', 'seccomp'} "
            "& set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_public_name_has_exactly_one_home_module():
    assert sorted(pytest_sandbox.__all__) == sorted(pytest_sandbox._HOME)


# Modules imported one by one where little is installed: the lab's namespace helper (``python -I``), the
# unprivileged runs (system python with only pyseccomp) and test_lab's user-namespace run (only h11).
# Each may import the standard library and what is listed here, nothing else (ARCHITECTURE.md "Rules").
THIRD_PARTY = {"pytest", "_pytest", "h11", "trustme", "httpx", "cryptography", "pyseccomp", "seccomp"}
LIGHT_MODULES = {
    "pytest_sandbox.network.netns": set(),
    "pytest_sandbox.network.addresses": set(),
    "pytest_sandbox.network.dns_stub": set(),
    "pytest_sandbox.network.lab.lab": {"h11"},
    "pytest_sandbox.network.lab.attribution": {"h11"},
    "pytest_sandbox.http.framing": {"h11"},
    "pytest_sandbox.http.upstream": {"h11"},
    "pytest_sandbox.policy.load": {"pyseccomp", "seccomp"},
    "pytest_sandbox.policy.diff": {"pyseccomp", "seccomp"},
    "pytest_sandbox.seccomp.compiler": {"pyseccomp", "seccomp"},
    "pytest_sandbox.seccomp.launcher": {"pyseccomp", "seccomp"},
    "pytest_sandbox.probes.syscall": {"pyseccomp", "seccomp"},
    "pytest_sandbox.probes.observed_identity": set(),
    "pytest_sandbox.verdicts.judgement": set(),
}


@pytest.mark.parametrize("module", sorted(LIGHT_MODULES))
def test_modules_run_with_little_installed_import_only_what_they_may(module):
    forbidden = sorted(THIRD_PARTY - LIGHT_MODULES[module])
    code = (f"import sys, {module}; found = set({forbidden!r}) & set(sys.modules); "
            "assert not found, sorted(found)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{module} imports {result.stderr.strip().splitlines()[-1:]}"
