"""The filter actually loaded in the probe runner, read back and evaluated (category ``syscall-evaluation``).

Evaluation, not proof: the live probes of ``test_syscalls.py`` remain the proof of every refusal. The
read-back filter is evaluated for every syscall number on x86_64, x32 and i386 and every argument class
its comparisons make, so a call with no harmless live probe is covered too, and the evaluation is checked
against the live probes of the same target. Test ids name the mode (``exec`` for a third party) and the
identity, e.g. ``proxy-nobody``.
"""


from pytest_sandbox.fixtures.conformance import parametrize_from_session
from pytest_sandbox.fixtures.loaded_filter import loaded_filter_params


def pytest_generate_tests(metafunc):
    parametrize_from_session(metafunc, (("loaded_filter_coverage", "coverage"),
                                        ("loaded_filter_agreement", "agreement")), loaded_filter_params)


def test_loaded_filter_refuses_what_the_requirement_refuses(loaded_filter_coverage, check_loaded_filter):
    check_loaded_filter(loaded_filter_coverage)


def test_evaluation_agrees_with_the_live_probes(loaded_filter_agreement, check_loaded_filter):
    check_loaded_filter(loaded_filter_agreement)
