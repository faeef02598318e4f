"""Invariants of the smuggling catalogue that keep "a new case = one row" true.

A row's request-targets are placeholders (``{get}`` ...) that each path's ``PathForm`` fills in; a
target written out as ``http://...`` would be sent unchanged inside the tunnel, so only rows whose
target *is* the attack may do that (``literal_target``). Expected failures of weakened proxies are
data too (``holes``, ``also_failed_by``), never lists kept in a test.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pytest_sandbox.catalogues import smuggling
from pytest_sandbox.catalogues.smuggling import (
    ABSOLUTE_FORM,
    BOTH_PATHS,
    FIRST_REQUEST_ONLY,
    H11_ONLY,
    SMUGGLING_CASES,
    TUNNEL_FORM,
    PathForm,
    SmugglingCase,
    case_by_id,
    render,
)
from pytest_sandbox.verdicts.smuggling import KEEP_READING_AFTER_DENIAL, cases_failed_by

WEAKENINGS = (H11_ONLY, FIRST_REQUEST_ONLY, KEEP_READING_AFTER_DENIAL)
PATH_NAMES = (ABSOLUTE_FORM.name, TUNNEL_FORM.name)
_PLACEHOLDER = re.compile(rb"\{[a-z]+\}")


def hard_coded_targets(cases: tuple[SmugglingCase, ...]) -> list[str]:
    """Rows that write an absolute-form target out without saying it is the attack."""
    return [case.case_id for case in cases if b"http://" in case.payload.lower() and not case.literal_target]


def test_no_template_hard_codes_a_request_target_unless_the_target_is_the_attack() -> None:
    assert hard_coded_targets(SMUGGLING_CASES) == []


def test_the_target_check_catches_a_row_that_writes_its_target_out() -> None:
    """The broken row a newcomer would add: its target would reach the tunnel as an absolute URL."""
    written_out = SmugglingCase("new-target", "a row with a new path", b"GET http://{host}/new HTTP/1.1\r\n"
                                b"Host: {host}\r\n\r\n", 400, must_close=True, reaches_backend=0, rfc="-")
    assert hard_coded_targets((*SMUGGLING_CASES, written_out)) == ["new-target"]
    assert b"http://inference.local/new" in render(written_out, TUNNEL_FORM, host="inference.local",
                                                    denied="inference.local")


def test_literal_target_rows_do_write_their_target_out() -> None:
    literal = [case.case_id for case in SMUGGLING_CASES if case.literal_target]
    assert literal == ["target-fragment", "target-backslash", "target-userinfo", "target-control-character",
                       "tf-connect-absolute-form"]
    assert all(b"http://{host}" in case_by_id(case_id).payload for case_id in literal)


def test_both_forms_fill_the_same_placeholders_with_five_byte_bodies() -> None:
    assert set(ABSOLUTE_FORM.targets) == set(TUNNEL_FORM.targets)
    assert len(ABSOLUTE_FORM.body) == len(TUNNEL_FORM.body) == 5


@pytest.mark.parametrize("form", [ABSOLUTE_FORM, TUNNEL_FORM], ids=lambda form: form.name)
def test_every_row_renders_without_a_placeholder_left(form: PathForm) -> None:
    for case in SMUGGLING_CASES:
        rendered = render(case, form, host="origin.test", denied="denied.test")
        assert not _PLACEHOLDER.search(rendered.replace(b"{   }", b"")), (case.case_id, rendered[:200])


def test_tunnel_form_makes_origin_form_routes_and_keeps_literal_targets_as_written() -> None:
    tunnel = render(case_by_id("routed-then-denied"), TUNNEL_FORM, host="inference.local", denied="inference.local")
    assert tunnel == (b"GET /v1/models HTTP/1.1\r\nHost: inference.local\r\n\r\n"
                      b"GET /secret HTTP/1.1\r\nHost: inference.local\r\n\r\n")
    literal = render(case_by_id("target-userinfo"), TUNNEL_FORM, host="inference.local", denied="inference.local")
    assert literal.startswith(b"GET http://inference.local@inference.local/ HTTP/1.1\r\n")


def test_also_failed_by_rows_name_a_known_weakening_and_path_and_say_why() -> None:
    for case in SMUGGLING_CASES:
        for weakening, path, why in case.also_failed_by:
            assert weakening in WEAKENINGS, case.case_id
            assert path in (*PATH_NAMES, BOTH_PATHS), case.case_id
            assert why.strip(), case.case_id


def test_no_row_lists_a_weakening_both_as_a_hole_and_as_also_failed_by() -> None:
    """``holes`` means the weakened reader forwards the row (framing and proxy tests check that);
    ``also_failed_by`` is every other way a weakening fails it. One row, one of the two."""
    both = [case.case_id for case in SMUGGLING_CASES
            if {weakening for weakening, _path, _why in case.also_failed_by} & case.holes]
    assert both == []


def test_cases_failed_by_adds_the_also_failed_by_rows_on_their_path_only() -> None:
    holes = {case.case_id for case in SMUGGLING_CASES if H11_ONLY in case.holes}
    absolute = cases_failed_by(H11_ONLY, ABSOLUTE_FORM.name)
    tunnel = cases_failed_by(H11_ONLY, TUNNEL_FORM.name)
    assert holes < absolute < tunnel
    assert "te-duplicate-header" in absolute  # "both"
    assert tunnel - absolute == {"target-fragment", "target-backslash", "target-userinfo",  # "tunnel" only
                                 "tf-authority-form-get", "tf-asterisk-form-get", "tf-connect-origin-form",
                                 "tf-connect-absolute-form", "rl-backslash-in-path", "rl-fragment-in-target",
                                 "tf-authority-form-post", "tf-authority-form-options", "tf-asterisk-form-post",
                                 "tf-asterisk-form-connect", "tf-schemeless-get", "tf-connect-schemeless"}
    with pytest.raises(ValueError, match="no weakening"):
        cases_failed_by(FIRST_REQUEST_ONLY, TUNNEL_FORM.name)


# --- issue #9 second corpus pass: sources, the byte-loop table, one row per payload --------------------------


def test_no_two_rows_send_the_same_bytes() -> None:
    """A corpus entry already in the catalogue under another name is not a second row (its source can say so)."""
    seen: dict[bytes, str] = {}
    for case in SMUGGLING_CASES:
        rendered = render(case, host="origin.test", denied="denied.test")
        assert rendered not in seen, (case.case_id, seen.get(rendered))
        seen[rendered] = case.case_id


def test_every_second_pass_row_names_its_corpus_source() -> None:
    rows = smuggling._SECOND_PASS_ROWS
    assert len(rows) >= 150
    assert all(case.source for case in rows), [case.case_id for case in rows if not case.source]
    by_family = Counter(case.family for case in rows)
    for family in ("content-length", "transfer-encoding", "trailer", "chunked-body", "connect-body", "h2c"):
        assert by_family[family] >= 4, (family, by_family)


def test_second_pass_h11_marks_name_rows_that_exist() -> None:
    ids = {case.case_id for case in SMUGGLING_CASES}
    assert smuggling._SECOND_PASS_H11_FORWARDS <= ids
    assert set(smuggling._SECOND_PASS_H11_OTHERWISE) <= ids


@pytest.mark.parametrize("position", sorted(smuggling._BYTE_LOOP_POSITIONS))
def test_every_default_byte_of_every_position_is_a_row_or_named_as_covered(position: str) -> None:
    """smuggler's default.py loop (13 bytes x 10 positions) is in the catalogue: generated as
    ``te-<position>-<byte>``, or already there under the row ``BYTE_LOOP_COVERED`` names (same bytes), or the
    same bytes as an earlier position's row."""
    rendered = {render(case, host="h", denied="d"): case.case_id for case in SMUGGLING_CASES}
    for byte in smuggling._SMUGGLER_DEFAULT_BYTES:
        row = smuggling._byte_loop_row(position, byte)
        covering = rendered.get(render(row, host="h", denied="d"))
        assert covering is not None, row.case_id
        if (position, byte) in smuggling.BYTE_LOOP_COVERED:
            assert covering == smuggling.BYTE_LOOP_COVERED[(position, byte)]
        elif covering != row.case_id:
            assert covering.startswith("te-") and row.case_id.endswith(("-0a", "-0d")), (row.case_id, covering)


def test_byte_classes_follow_the_rfc_grammar() -> None:
    classes = {byte: smuggling._byte_class(byte) for byte in range(256) if not 0x21 <= byte <= 0x7E}
    assert {byte for byte, kind in classes.items() if kind == "ows"} == {0x09, 0x20}
    assert (classes[0x0D], classes[0x0A], classes[0x7F], classes[0x00], classes[0x80]) == ("cr", "lf", "ctl", "ctl",
                                                                                            "obs")
    assert set(classes[byte] for byte in smuggling._SMUGGLER_DEFAULT_BYTES) == {"ows", "cr", "lf", "ctl", "obs"}


def test_byte_loop_rows_served_or_refused_as_the_table_says() -> None:
    row = case_by_id("te-midspace-a0")
    assert (row.violation, row.family, row.must_close) == ("te-not-chunked", "transfer-encoding", True)
    assert case_by_id("te-xprespace-20").is_positive_control
    assert case_by_id("te-prespace-09").family == "header-name"  # obs-fold to us, a name prefix to a lenient reader
    assert case_by_id("te-rxprespace-0a").is_positive_control  # "X: X\r\nTransfer-Encoding: chunked" is valid
    assert b"Transfer-Encoding\x04: chunked" in case_by_id("te-postspace-04").payload
