"""The proxy's event loop choice (``run_on_loop``): by default uvloop when the ``fast`` extra is installed and
the stdlib loop otherwise; a loop asked for by name is that loop or a clear error, never a silent switch."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from pytest_sandbox.network.proxy import server
from pytest_sandbox.network.proxy.server import LOOP_ENVIRONMENT_VARIABLE, run_on_loop

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def loop_module(name: str | None) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_on_loop(main(), name)
    return seen[0]


def test_the_default_is_uvloop_when_installed_and_the_stdlib_loop_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENVIRONMENT_VARIABLE, raising=False)
    assert loop_module(None).startswith("uvloop" if HAS_UVLOOP else "asyncio")


def test_the_stdlib_loop_by_name_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop_module("asyncio").startswith("asyncio")
    monkeypatch.setenv(LOOP_ENVIRONMENT_VARIABLE, "asyncio")
    assert loop_module(None).startswith("asyncio")


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop (the fast extra) is not installed")
def test_uvloop_when_asked_by_name_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop_module("uvloop").startswith("uvloop")
    monkeypatch.setenv(LOOP_ENVIRONMENT_VARIABLE, "auto")
    assert loop_module(None).startswith("uvloop")


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = __import__

    def no_uvloop(name: str, *args: object, **kwargs: object) -> object:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("builtins.__import__", no_uvloop)
    with pytest.raises(ValueError, match=r"pytest-sandbox\[fast\]"):
        server._loop_factory("uvloop")
    assert server._loop_factory("auto") is asyncio.new_event_loop  # auto falls back to the stdlib loop


def test_an_unknown_loop_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        server._loop_factory("trio")
