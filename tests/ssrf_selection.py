"""For the tests that run ``conformance/test_ssrf.py`` against a fake: ``-k`` expressions by case id, and the
parameter ids a run failed.

The port sweep (``<case>-port-443``) and the request-line family (``method-<m>-<case>``, ``http10-<case>``) carry
the id of the catalogue case they were made from, so ``-k meta-imds-169`` selects them too; a test that counts
exactly which catalogue attempts fail keeps to the catalogue's own.
"""

from __future__ import annotations

from pytest_sandbox.catalogues.ssrf_cases import CASE_PORT, SsrfCase

ONLY_THE_CATALOGUES_OWN = "not port-443 and not method- and not http10"


def catalogue_selection(expression: str) -> str:
    """``expression``, limited to the catalogue's own attempts."""
    return f"({expression}) and {ONLY_THE_CATALOGUES_OWN}"


def is_catalogues_own(case: SsrfCase) -> bool:
    """Whether :func:`catalogue_selection` keeps ``case``'s attempts (not a request-line or port-sweep copy)."""
    return not case.method and case.http_version == "1.1" and case.port == CASE_PORT


def failed_params(output: str) -> set[str]:
    """The parameter ids (``<form>-<case>``) of the tests a ``-rf`` run lists as FAILED."""
    return {line.split("[", 1)[1].split("]", 1)[0] for line in output.splitlines() if line.startswith("FAILED")}
