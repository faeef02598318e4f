"""A DNS stub for the lab: pure wire-format functions, a zone, and an asyncio UDP server.

The stub answers A and AAAA questions from a :class:`DnsZone` with TTL 0, so a proxy under test can
never use a cached answer to hide a rebinding bug. Names can have several answers ("mixed": one public,
one private) or answers that alternate per query ("rebinding", as safeurl's ``*-rbnd`` names do).
Names under the public "echo the address" services the SSRF corpora use are answered by rule, as the
real service would answer (:func:`service_answers`: nip.io, sslip.io, xip.io, localtest.me, 1u.ms
including its rebinding form), so any spelling of them resolves in the lab without a zone row and
nothing leaves the lab. Everything else is NXDOMAIN. Only the server touches sockets; encoding,
decoding and answering are pure functions over bytes, tested without a network.

References: RFC 1035 §4.1 (message format), §4.1.4 (compression), RFC 3596 (AAAA), RFC 4343 (names
compare case-insensitively, ASCII only), RFC 2308 (NXDOMAIN vs NODATA).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import cast

__all__ = [
    "DnsAnswer",
    "DnsFormatError",
    "DnsQuery",
    "DnsResponse",
    "DnsStubProtocol",
    "DnsZone",
    "QueryType",
    "ResponseCode",
    "answer_query",
    "decode_name",
    "encode_name",
    "encode_query",
    "encode_response",
    "parse_query",
    "parse_response",
    "service_answers",
]


class QueryType(IntEnum):
    A = 1  # RFC 1035 §3.2.2
    AAAA = 28  # RFC 3596 §2.1


class ResponseCode(IntEnum):
    """RCODE values, RFC 1035 §4.1.1."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


CLASS_IN = 1
HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
QUESTION_TAIL = struct.Struct("!HH")  # qtype, qclass
RECORD_TAIL = struct.Struct("!HHIH")  # type, class, ttl, rdlength

FLAG_QR = 0x8000  # response
FLAG_AA = 0x0400  # authoritative answer
FLAG_TC = 0x0200  # truncated
FLAG_RD = 0x0100  # recursion desired (echoed back)
OPCODE_SHIFT, OPCODE_MASK = 11, 0xF
RCODE_MASK = 0xF

MAX_LABEL_LENGTH = 63  # RFC 1035 §2.3.4
MAX_NAME_LENGTH = 255  # RFC 1035 §2.3.4, wire octets including the root label
MAX_UDP_MESSAGE = 512  # RFC 1035 §4.2.1, without EDNS
POINTER_TAG = 0xC0  # RFC 1035 §4.1.4: the top two bits 11 mark a compression pointer
QUESTION_NAME_POINTER = b"\xc0\x0c"  # the question name always starts right after the header
RECORD_ADDRESS_LENGTH: dict[int, int] = {QueryType.A: 4, QueryType.AAAA: 16}


class DnsFormatError(ValueError):
    """A DNS message or name that does not follow RFC 1035."""


@dataclass(frozen=True)
class DnsQuery:
    query_id: int
    name: str
    qtype: int
    qclass: int = CLASS_IN
    recursion_desired: bool = True
    opcode: int = 0


@dataclass(frozen=True)
class DnsAnswer:
    name: str
    rtype: int
    ttl: int
    rdata: bytes

    @property
    def address(self) -> str | None:
        """The address text for an A/AAAA record, else None."""
        if self.rtype == QueryType.A and len(self.rdata) == 4:
            return str(ipaddress.IPv4Address(self.rdata))
        if self.rtype == QueryType.AAAA and len(self.rdata) == 16:
            return str(ipaddress.IPv6Address(self.rdata))
        return None


@dataclass(frozen=True)
class DnsResponse:
    query_id: int
    rcode: int
    truncated: bool
    question_name: str | None
    answers: tuple[DnsAnswer, ...]

    @property
    def addresses(self) -> list[str]:
        return [answer.address for answer in self.answers if answer.address is not None]


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Lower-case ASCII letters only (RFC 4343 §3) and drop one trailing root dot."""
    folded = "".join(chr(ord(ch) + 32) if "A" <= ch <= "Z" else ch for ch in name)
    return folded[:-1] if folded.endswith(".") and folded != "." else folded


def encode_name(name: str) -> bytes:
    """Encode a dotted name as uncompressed labels (RFC 1035 §3.1). IDNs must be A-labels already."""
    stripped = name[:-1] if name.endswith(".") else name
    if not stripped:
        return b"\x00"
    try:
        labels = [label.encode("ascii") for label in stripped.split(".")]
    except UnicodeEncodeError as exc:
        raise DnsFormatError(f"name {name!r} is not ASCII; encode IDNs as A-labels first") from exc
    encoded = bytearray()
    for label in labels:
        if not label:
            raise DnsFormatError(f"name {name!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise DnsFormatError(f"label {label!r} is longer than {MAX_LABEL_LENGTH} octets")
        encoded += bytes([len(label)]) + label
    encoded += b"\x00"
    if len(encoded) > MAX_NAME_LENGTH:
        raise DnsFormatError(f"name {name!r} is longer than {MAX_NAME_LENGTH} octets on the wire")
    return bytes(encoded)


def decode_name(message: bytes, offset: int) -> tuple[str, int]:
    """Decode a possibly compressed name at ``offset``; return (name, offset after the name).

    Compression pointers (RFC 1035 §4.1.4) must point strictly backwards from where they occur;
    that rules out loops without a hop counter. Labels are decoded as latin-1 so that any octet
    survives the round trip.
    """
    labels: list[str] = []
    end_of_name: int | None = None
    position = offset
    wire_length = 0
    while True:
        if position >= len(message):
            raise DnsFormatError("name runs past the end of the message")
        length = message[position]
        tag = length & POINTER_TAG
        if tag == POINTER_TAG:
            if position + 1 >= len(message):
                raise DnsFormatError("truncated compression pointer")
            target = ((length & ~POINTER_TAG) << 8) | message[position + 1]
            if target >= position:
                raise DnsFormatError(f"compression pointer at {position} does not point backwards")
            if end_of_name is None:
                end_of_name = position + 2
            position = target
            continue
        if tag != 0:
            # 01 and 10 prefixes are reserved (RFC 6891 §5 retired extended labels).
            raise DnsFormatError(f"reserved label type 0x{tag:02x} at {position}")
        position += 1
        if length == 0:
            break
        if position + length > len(message):
            raise DnsFormatError("label runs past the end of the message")
        labels.append(message[position:position + length].decode("latin-1"))
        wire_length += length + 1
        if wire_length + 1 > MAX_NAME_LENGTH:
            raise DnsFormatError(f"name is longer than {MAX_NAME_LENGTH} octets on the wire")
        position += length
    return ".".join(labels), (end_of_name if end_of_name is not None else position)


# --------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------


def encode_query(name: str, qtype: int, query_id: int, *, recursion_desired: bool = True) -> bytes:
    """A standard query (opcode 0) for one question of class IN."""
    flags = FLAG_RD if recursion_desired else 0
    return (
        HEADER.pack(query_id & 0xFFFF, flags, 1, 0, 0, 0)
        + encode_name(name)
        + QUESTION_TAIL.pack(qtype, CLASS_IN)
    )


def parse_query(message: bytes) -> DnsQuery:
    """Decode a query with exactly one question; raise DnsFormatError otherwise."""
    if len(message) < HEADER.size:
        raise DnsFormatError("message shorter than the 12-octet header")
    query_id, flags, qdcount, _ancount, _nscount, _arcount = HEADER.unpack_from(message)
    if flags & FLAG_QR:
        raise DnsFormatError("message is a response, not a query")
    if qdcount != 1:
        raise DnsFormatError(f"expected exactly one question, got {qdcount}")
    name, offset = decode_name(message, HEADER.size)
    if offset + QUESTION_TAIL.size > len(message):
        raise DnsFormatError("question runs past the end of the message")
    qtype, qclass = QUESTION_TAIL.unpack_from(message, offset)
    return DnsQuery(
        query_id=query_id,
        name=name,
        qtype=qtype,
        qclass=qclass,
        recursion_desired=bool(flags & FLAG_RD),
        opcode=(flags >> OPCODE_SHIFT) & OPCODE_MASK,
    )


def _address_rdata(qtype: int, address: str) -> bytes:
    parsed = ipaddress.ip_address(address)
    if (qtype == QueryType.A) != (parsed.version == 4):
        raise ValueError(f"{address} does not fit a type {qtype} record")
    return parsed.packed


def encode_response(query: DnsQuery, answers: Sequence[str] = (),
                    rcode: int = ResponseCode.NOERROR, *, ttl: int = 0) -> bytes:
    """An authoritative response echoing ``query``'s question, with one record per address.

    Answer names are compression pointers to the question name. If the answers do not fit the
    classic 512-octet UDP limit, the message carries as many as fit and sets TC (RFC 1035 §4.2.1).
    """
    flags = FLAG_QR | FLAG_AA | (query.opcode << OPCODE_SHIFT) | (rcode & RCODE_MASK)
    if query.recursion_desired:
        flags |= FLAG_RD
    question = encode_name(query.name) + QUESTION_TAIL.pack(query.qtype, query.qclass)
    records: list[bytes] = []
    size = HEADER.size + len(question)
    for address in answers:
        rdata = _address_rdata(query.qtype, address)
        record = QUESTION_NAME_POINTER + RECORD_TAIL.pack(query.qtype, CLASS_IN, ttl, len(rdata)) + rdata
        if size + len(record) > MAX_UDP_MESSAGE:
            flags |= FLAG_TC
            break
        records.append(record)
        size += len(record)
    header = HEADER.pack(query.query_id, flags, 1, len(records), 0, 0)
    return header + question + b"".join(records)


def parse_response(message: bytes) -> DnsResponse:
    """Decode a response: header, the question name, and every answer record (any type)."""
    if len(message) < HEADER.size:
        raise DnsFormatError("message shorter than the 12-octet header")
    query_id, flags, qdcount, ancount, _nscount, _arcount = HEADER.unpack_from(message)
    if not flags & FLAG_QR:
        raise DnsFormatError("message is a query, not a response")
    offset = HEADER.size
    question_name: str | None = None
    for _ in range(qdcount):
        name, offset = decode_name(message, offset)
        question_name = question_name if question_name is not None else name
        offset += QUESTION_TAIL.size
    answers: list[DnsAnswer] = []
    for _ in range(ancount):
        name, offset = decode_name(message, offset)
        if offset + RECORD_TAIL.size > len(message):
            raise DnsFormatError("resource record header runs past the end of the message")
        rtype, _rclass, ttl, rdlength = RECORD_TAIL.unpack_from(message, offset)
        offset += RECORD_TAIL.size
        if offset + rdlength > len(message):
            raise DnsFormatError("resource record data runs past the end of the message")
        rdata = message[offset:offset + rdlength]
        expected_length = RECORD_ADDRESS_LENGTH.get(rtype)
        if expected_length is not None and rdlength != expected_length:
            raise DnsFormatError(f"type {rtype} record with {rdlength} octets of data")
        answers.append(DnsAnswer(name=name, rtype=rtype, ttl=ttl, rdata=rdata))
        offset += rdlength
    return DnsResponse(
        query_id=query_id,
        rcode=flags & RCODE_MASK,
        truncated=bool(flags & FLAG_TC),
        question_name=question_name,
        answers=tuple(answers),
    )


# --------------------------------------------------------------------------------------------------
# Wildcard services: what the real DNS services answer for any name under them (pure)
# --------------------------------------------------------------------------------------------------

_DOTTED = re.compile(r"(?:^|.*[.-])((?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|"
                     r"1[0-9][0-9]|[1-9]?[0-9])){3})$")
_DASHED = re.compile(r"(?:^|.*[.-])((?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:-(?:25[0-5]|2[0-4][0-9]|"
                     r"1[0-9][0-9]|[1-9]?[0-9])){3})$")
_HEX = re.compile(r"(?:^|.*[.-])([0-9a-f]{8})$")
_SSLIP_V6 = re.compile(r"(?:^|.*\.)([0-9a-f-]*--[0-9a-f-]*|(?:[0-9a-f]{1,4}-){7}[0-9a-f]{1,4})$")
_ONE_U_MS = re.compile(r"make-(?P<first>.+?)-(?:rebind|rbnd)-(?P<then>.+)-rr|make-(?P<only>.+)-rr")


def _echoed_address(prefix: str, *, dashes: bool, hex_form: bool, ipv6: bool) -> str | None:
    """The address a nip.io-style service reads from the labels in front of its domain: the last
    dotted quad (``app.10.0.0.1``), dashed quad (``app-10-0-0-1``), 8 hex digits (``app.7f000001``),
    or sslip.io's dashed IPv6 (``--1``, ``fe80--1``)."""
    for pattern, enabled in ((_DOTTED, True), (_DASHED, dashes), (_HEX, hex_form)):
        match = pattern.match(prefix) if enabled else None
        if match is not None:
            text = match.group(1)
            if pattern is _HEX:
                return str(ipaddress.IPv4Address(int(text, 16)))
            return str(ipaddress.IPv4Address(text.replace("-", ".")))
    match = _SSLIP_V6.match(prefix) if ipv6 else None
    if match is not None:
        try:
            return str(ipaddress.IPv6Address(match.group(1).replace("-", ":")))
        except ValueError:
            return None
    return None


def _one_u_ms_address(text: str) -> str | None:
    for candidate in (text, text.replace("-", ".")):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


# domain -> (dashed quads, 8 hex digits, dashed IPv6): nip.io and sslip.io document all their forms
# (https://nip.io, https://sslip.io); xip.io (Basecamp, retired) read dotted quads only.
_ECHO_SERVICES: dict[str, tuple[bool, bool, bool]] = {
    "nip.io": (True, True, False),
    "sslip.io": (True, True, True),
    "xip.io": (False, False, False),
}
LOCALTEST_ME = "localtest.me"  # it and every name under it: 127.0.0.1 (A only)


def service_answers(name: str) -> tuple[tuple[str, ...], ...] | None:
    """What the real service answers for ``name``, as answer sets (more than one: a rebinding name,
    one set per successive query), or None when no service rule covers the name. Pure.

    * ``<anything>.<a.b.c.d>.nip.io``, ``<anything>-<a-b-c-d>.nip.io``, ``<anything>.<8 hex>.nip.io``:
      the embedded address; the same for sslip.io, which also reads dashed IPv6 (``--1.sslip.io``);
      xip.io reads dotted quads. The base domain alone (and a name with no address) has no rule.
    * ``localtest.me`` and ``*.localtest.me``: 127.0.0.1.
    * 1u.ms: ``make-<ip>-rr.1u.ms`` answers ``<ip>``; ``make-<ip1>-rebind-<ip2>-rr.1u.ms`` answers
      ``<ip1>`` then ``<ip2>`` (its DNS-rebinding form); addresses dotted or dashed.
    """
    key = normalize_name(name)
    if key == LOCALTEST_ME or key.endswith("." + LOCALTEST_ME):
        return (("127.0.0.1",),)
    if key.endswith(".1u.ms"):
        match = _ONE_U_MS.fullmatch(key.removesuffix(".1u.ms"))
        if match is None:
            return None
        texts = (match["first"], match["then"]) if match["only"] is None else (match["only"],)
        addresses = [_one_u_ms_address(text) for text in texts]
        if any(address is None for address in addresses):
            return None
        return tuple((address,) for address in addresses if address is not None)
    for domain, (dashes, hex_form, ipv6) in _ECHO_SERVICES.items():
        if key.endswith("." + domain):
            address = _echoed_address(key.removesuffix("." + domain), dashes=dashes, hex_form=hex_form, ipv6=ipv6)
            return None if address is None else ((address,),)
    return None


# --------------------------------------------------------------------------------------------------
# The zone and answering
# --------------------------------------------------------------------------------------------------


def _family_matches(qtype: int, address: str) -> bool:
    version = ipaddress.ip_address(address).version
    return (qtype == QueryType.A and version == 4) or (qtype == QueryType.AAAA and version == 6)


@dataclass(frozen=True)
class ZoneLookup:
    exists: bool
    addresses: tuple[str, ...]


class DnsZone:
    """Names the stub knows. Thread-safe: tests edit it while the lab's loop thread answers.

    * plain names: ``{name: [addresses]}``; several addresses give several answers;
    * names under a wildcard service (:func:`service_answers`) without a row of their own, by rule;
    * rebinding names: a cycle of answer sets, one step per query. The step counter is kept per
      (name, query type): getaddrinfo(3) asks A and AAAA together, and a shared counter would let the
      AAAA query consume the "private" step so that A always saw the "public" one.
    """

    def __init__(self, names: Mapping[str, Iterable[str]] | None = None, *, services: bool = True) -> None:
        self._lock = threading.Lock()
        self._services = services  # answer wildcard-service names by rule (:func:`service_answers`)
        self._names: dict[str, tuple[str, ...]] = {}
        self._rebinding: dict[str, tuple[tuple[str, ...], ...]] = {}
        self._rebinding_steps: dict[tuple[str, int], int] = {}
        self._queries: list[tuple[str, int]] = []
        if names:
            self.set_names(names)

    @staticmethod
    def _validated(addresses: Iterable[str]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_address(address)) for address in addresses)

    def set_names(self, names: Mapping[str, Iterable[str]]) -> None:
        """Replace every plain and rebinding name with ``names``."""
        validated = {normalize_name(name): self._validated(addresses) for name, addresses in names.items()}
        with self._lock:
            self._names = validated
            self._rebinding.clear()
            self._rebinding_steps.clear()

    def add_name(self, name: str, addresses: Iterable[str]) -> None:
        validated = self._validated(addresses)
        with self._lock:
            self._names[normalize_name(name)] = validated

    def add_rebinding_name(self, name: str, answer_sets: Sequence[Sequence[str]]) -> None:
        """Answer the n-th query of each type with ``answer_sets[n % len(answer_sets)]``."""
        if not answer_sets:
            raise ValueError("a rebinding name needs at least one answer set")
        validated = tuple(self._validated(answer_set) for answer_set in answer_sets)
        key = normalize_name(name)
        with self._lock:
            self._rebinding[key] = validated
            for step_key in [step_key for step_key in self._rebinding_steps if step_key[0] == key]:
                del self._rebinding_steps[step_key]

    def remove_name(self, name: str) -> None:
        key = normalize_name(name)
        with self._lock:
            self._names.pop(key, None)
            self._rebinding.pop(key, None)

    def _service_rule(self, key: str) -> tuple[tuple[str, ...], ...] | None:
        return service_answers(key) if self._services else None

    def lookup(self, name: str, qtype: int) -> ZoneLookup:
        """Answer one question (advancing a rebinding name's step) and log it."""
        key = normalize_name(name)
        with self._lock:
            self._queries.append((key, qtype))
            if key in self._names and key not in self._rebinding:
                candidates = self._names[key]
            elif (answer_sets := self._rebinding.get(key) or self._service_rule(key)) is not None:
                # A rebinding name, or a wildcard service's rule: one answer set per query, per type.
                step = self._rebinding_steps.get((key, qtype), 0)
                self._rebinding_steps[(key, qtype)] = step + 1
                candidates = answer_sets[step % len(answer_sets)]
            else:
                return ZoneLookup(exists=False, addresses=())
        return ZoneLookup(
            exists=True,
            addresses=tuple(address for address in candidates if _family_matches(qtype, address)),
        )

    def queries(self) -> list[tuple[str, int]]:
        """Every question answered so far, as (normalized name, qtype), oldest first."""
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()


def answer_query(zone: DnsZone, message: bytes) -> bytes | None:
    """The stub's whole behaviour: request bytes in, response bytes out (None: stay silent).

    Silence for anything without a usable header or that is itself a response (never answer an
    answer: two stubs must not ping-pong). FORMERR for a malformed question, NOTIMP for opcodes
    other than QUERY, NXDOMAIN for unknown names, NODATA (NOERROR, no answers; RFC 2308 §2.2) for
    known names without records of the asked type.
    """
    if len(message) < HEADER.size:
        return None
    query_id, flags = struct.unpack_from("!HH", message)
    if flags & FLAG_QR:
        return None
    try:
        query = parse_query(message)
    except DnsFormatError:
        return HEADER.pack(query_id, FLAG_QR | ResponseCode.FORMERR, 0, 0, 0, 0)
    if query.opcode != 0:
        return HEADER.pack(query_id, FLAG_QR | (query.opcode << OPCODE_SHIFT) | ResponseCode.NOTIMP,
                           0, 0, 0, 0)
    if query.qclass != CLASS_IN:
        return encode_response(query, (), ResponseCode.REFUSED)
    result = zone.lookup(query.name, query.qtype)
    if not result.exists:
        return encode_response(query, (), ResponseCode.NXDOMAIN)
    return encode_response(query, result.addresses)


class DnsStubProtocol(asyncio.DatagramProtocol):
    """Serves :func:`answer_query` over UDP on whatever socket the endpoint was given."""

    def __init__(self, zone: DnsZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport in every
        # Python version, so narrow by cast rather than isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = answer_query(self.zone, data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
