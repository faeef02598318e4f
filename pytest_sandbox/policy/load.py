"""Finding a policy: a bundled name, a TOML file or an OCI/Docker profile, and the bundled baseline.

The one entry point the rest of the package calls (:func:`load_policy`). It picks the reader
(``from_toml.py``, ``from_oci.py``) and is the one place that knows where the bundled policies live,
so the readers import only the model and nothing imports back up (no cycle).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.inference.routes import InferenceRoute
from pytest_sandbox.policy.checks import extends_problem, read_policy_text, require_pyseccomp, rule_floor_problem
from pytest_sandbox.policy.from_oci import load_oci_profile, looks_like_oci_profile
from pytest_sandbox.policy.from_toml import load_toml_policy
from pytest_sandbox.policy.model import Policy

BUNDLED_POLICIES = ("baseline", "openshell-pre-819", "strict")


def bundled_policy_path(name: str) -> Path:
    return Path(str(resources.files("pytest_sandbox.policy") / "bundled" / f"{name}.toml"))


def load_policy(name_or_path: str | Path, caps: str | None = None) -> Policy:
    """Load a bundled policy by name (``baseline``), or a file by path: a TOML policy, or an OCI seccomp
    profile (JSON, or a Security Profiles Operator ``SeccompProfile`` YAML resource) told apart by content,
    not suffix. ``caps`` (``--sandbox-caps``) names the capability set that resolves a profile's
    ``includes.caps``/``excludes.caps`` (default: Docker's default set); validate it fully."""
    require_pyseccomp()
    text = str(name_or_path)
    path = bundled_policy_path(text) if text in BUNDLED_POLICIES else Path(text)
    if not path.exists():
        raise PolicyError(
            f"policy {text!r} not found: give a path to a TOML policy file or one of the bundled "
            f"names {', '.join(BUNDLED_POLICIES)}"
        )
    resolved = path.resolve()
    chain = _extends_chain()
    problem = extends_problem(chain, resolved)
    if problem is not None:  # a cycle would recurse until RecursionError
        raise PolicyError(problem)
    read_policy_text(resolved)  # a regular, bounded, UTF-8 text file, before any reader sniffs or parses it
    chain.append(resolved)
    try:
        policy = load_oci_profile(resolved, caps) if looks_like_oci_profile(resolved) \
            else load_toml_policy(resolved, _BUNDLED)
    finally:
        chain.pop()
    problem = rule_floor_problem(policy)
    if problem is not None:  # before planning or compiling, which take minutes for such a policy
        raise PolicyError(problem)
    return policy


_LOADING = threading.local()


def _extends_chain() -> list[Path]:
    """The policies this thread is loading, outermost first (a TOML policy loads what it extends)."""
    if not hasattr(_LOADING, "chain"):
        _LOADING.chain = []
    chain: list[Path] = _LOADING.chain
    return chain


@lru_cache(maxsize=1)
def baseline_policy() -> Policy:
    """The bundled baseline: also where every network and inference default comes from."""
    return load_policy("baseline")


def baseline_routes() -> tuple[InferenceRoute, ...]:
    """The inference routes of the bundled baseline policy (``policy/bundled/baseline.toml``)."""
    return baseline_policy().inference_routes


class _BundledLibrary:
    """The :class:`~pytest_sandbox.policy.from_toml.PolicyLibrary` every TOML policy is read with."""

    def extended_path(self, base: str, child: Path) -> Path:
        return bundled_policy_path(base) if base in BUNDLED_POLICIES else child.parent / base

    def load(self, path: Path) -> Policy:
        return load_policy(path)

    def is_baseline(self, path: Path) -> bool:
        return path == bundled_policy_path("baseline").resolve()

    def baseline(self) -> Policy:
        return baseline_policy()


_BUNDLED = _BundledLibrary()
