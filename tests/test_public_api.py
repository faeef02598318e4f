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
