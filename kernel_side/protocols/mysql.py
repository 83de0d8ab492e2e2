"""MySQL / MariaDB client/server protocol parser for captured exchanges: bytes in, records out.

What the kernel hands us per exchange (see ``bpf/agent.bpf.c``): the first bytes the client sent
before the server answered, and the first bytes of the server's answer, plus total counts. For
MySQL that means:

* The server speaks first (the handshake greeting). The kernel's pairing drops response-direction
  bytes that arrive before any request (counted as ``unmatched_responses``), so the greeting is
  never captured. The first exchange of a connection is the client's HandshakeResponse41
  (sequence id 1) and the server's OK / ERR / auth-switch answer (sequence id 2).
* Commands without a response (``COM_STMT_CLOSE``, ``COM_STMT_SEND_LONG_DATA``) are followed by
  the next command without the server writing in between, so one request buffer may hold
  several commands. Each command starts a packet with sequence id 0; its response packets
  count up from 1, so a response buffer is split where the sequence id falls back to 1.

Every packet is a 3-byte little-endian payload length, a 1-byte sequence id, the payload.

Contract: pure functions, never raise on any input, linear in the input length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "CMD_NAMES",
    "COM_INIT_DB",
    "COM_PING",
    "COM_QUERY",
    "COM_QUIT",
    "COM_STMT_CLOSE",
    "COM_STMT_EXECUTE",
    "COM_STMT_PREPARE",
    "NO_RESPONSE",
    "Command",
    "Handshake",
    "Packet",
    "Reply",
    "looks_like_auth_continuation",
    "looks_like_command",
    "looks_like_handshake_response",
    "parse_handshake_response",
    "parse_reply",
    "parse_request",
    "split_packets",
    "split_replies",
    "vendor_of_server_executable",
]

COM_QUIT: Final = 0x01
COM_INIT_DB: Final = 0x02
COM_QUERY: Final = 0x03
COM_FIELD_LIST: Final = 0x04
COM_STATISTICS: Final = 0x09
COM_PING: Final = 0x0E
COM_CHANGE_USER: Final = 0x11
COM_STMT_PREPARE: Final = 0x16
COM_STMT_EXECUTE: Final = 0x17
COM_STMT_SEND_LONG_DATA: Final = 0x18
COM_STMT_CLOSE: Final = 0x19
COM_STMT_RESET: Final = 0x1A
COM_SET_OPTION: Final = 0x1B
COM_STMT_FETCH: Final = 0x1C
COM_RESET_CONNECTION: Final = 0x1F
COM_STMT_BULK_EXECUTE: Final = 0xFA  # MariaDB

CMD_NAMES: Final = {
    COM_QUIT: "QUIT",
    COM_INIT_DB: "INIT_DB",
    COM_QUERY: "QUERY",
    COM_FIELD_LIST: "FIELD_LIST",
    COM_STATISTICS: "STATISTICS",
    COM_PING: "PING",
    COM_CHANGE_USER: "CHANGE_USER",
    COM_STMT_PREPARE: "STMT_PREPARE",
    COM_STMT_EXECUTE: "STMT_EXECUTE",
    COM_STMT_SEND_LONG_DATA: "STMT_SEND_LONG_DATA",
    COM_STMT_CLOSE: "STMT_CLOSE",
    COM_STMT_RESET: "STMT_RESET",
    COM_SET_OPTION: "SET_OPTION",
    COM_STMT_FETCH: "STMT_FETCH",
    COM_RESET_CONNECTION: "RESET_CONNECTION",
    COM_STMT_BULK_EXECUTE: "STMT_BULK_EXECUTE",
}
"""Commands the detector accepts as the first packet of a request."""

NO_RESPONSE: Final = frozenset({COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA})
"""Commands the server never answers (COM_QUIT gets no answer either: the socket closes)."""

# Capability flags (HandshakeResponse41).
CLIENT_MYSQL: Final = 0x1  # a.k.a. CLIENT_LONG_PASSWORD; MariaDB servers clear it
CLIENT_CONNECT_WITH_DB: Final = 0x8
CLIENT_COMPRESS: Final = 0x20
CLIENT_PROTOCOL_41: Final = 0x200
CLIENT_SSL: Final = 0x800
CLIENT_SECURE_CONNECTION: Final = 0x8000
CLIENT_PLUGIN_AUTH: Final = 0x80000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: Final = 0x200000
CLIENT_QUERY_ATTRIBUTES: Final = 0x8000000  # MySQL 8.0.23+: COM_QUERY carries attributes

MAX_PACKET: Final = 0xFFFFFF
MAX_TEXT: Final = 4096
"""Longest string this module decodes out of a packet (query texts are cut by the capture)."""


# Packet, Command and Reply are read-only by convention, not frozen: a frozen dataclass costs
# about 2.5x as much to build, and an exchange builds several.
@dataclass(slots=True)
class Packet:
    """One packet as captured; ``payload`` is cut short when the capture ended inside it."""

    seq: int
    length: int
    """The payload length the header declares."""
    payload: bytes

    @property
    def complete(self) -> bool:
        """Whether the whole payload was captured."""
        return len(self.payload) == self.length


@dataclass(slots=True)
class Command:
    """One client command."""

    code: int
    args: bytes
    """The bytes after the command byte that were captured."""
    complete: bool
    """False when the capture cut the command's packet."""

    @property
    def text(self) -> str:
        """``args`` decoded as text (query, schema name); lossy, never raises."""
        return self.args[:MAX_TEXT].decode("utf-8", "replace")

    @property
    def statement_id(self) -> int | None:
        """The statement id of COM_STMT_EXECUTE/CLOSE/RESET/FETCH/SEND_LONG_DATA."""
        if len(self.args) < 4:
            return None
        return int.from_bytes(self.args[:4], "little")


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a HandshakeResponse41 tells (the client's first packet, sequence id 1)."""

    capabilities: int
    username: str | None
    database: str | None
    auth_plugin: str | None
    mariadb: bool
    """The client echoed a MariaDB server's capabilities: ``CLIENT_MYSQL`` clear and MariaDB's
    extended capabilities in the filler. Only MariaDB-aware clients do this, and only when the
    server's greeting announced MariaDB, so True is reliable; False proves nothing."""

    @property
    def ssl(self) -> bool:
        """The client asked for TLS: everything after this packet is encrypted."""
        return bool(self.capabilities & CLIENT_SSL)

    @property
    def compressed(self) -> bool:
        """The client asked for the compressed protocol (different framing)."""
        return bool(self.capabilities & CLIENT_COMPRESS)


@dataclass(slots=True)
class Reply:
    """The first packet of the server's answer to one command, classified."""

    kind: str
    """``ok``, ``err``, ``eof``, ``result_set``, ``local_infile``, ``auth`` or ``unknown``."""
    error_code: int | None = None
    sql_state: str | None = None
    message: str | None = None
    statement_id: int | None = None
    """From a COM_STMT_PREPARE OK."""
    column_count: int | None = None


# --- framing -------------------------------------------------------------------------------


def split_packets(data: bytes, limit: int = 1 << 30) -> list[Packet]:
    """The packets in ``data``; the last one may be cut. Stops at an empty header tail."""
    out: list[Packet] = []
    n = len(data)
    i = 0
    while i + 4 <= n and len(out) < limit:
        length = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16)
        seq = data[i + 3]
        start = i + 4
        out.append(Packet(seq, length, data[start : start + length]))
        i = start + length
    return out


def _lenenc(b: bytes, i: int) -> tuple[int | None, int]:
    """A length-encoded integer at ``b[i]``: (value or None, next offset)."""
    if i >= len(b):
        return None, i
    first = b[i]
    if first < 0xFB:
        return first, i + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or i + 1 + size > len(b):
        return None, i + 1
    return int.from_bytes(b[i + 1 : i + 1 + size], "little"), i + 1 + size


def _cstr(b: bytes, i: int) -> tuple[str | None, int]:
    end = b.find(b"\0", i, i + MAX_TEXT)
    if end < 0:
        return None, len(b)
    return b[i:end].decode("utf-8", "replace"), end + 1


# --- detection ------------------------------------------------------------------------------


def _first_header(data: bytes) -> tuple[int, int] | None:
    if len(data) < 5:
        return None
    return data[0] | (data[1] << 8) | (data[2] << 16), data[3]


def _length_fits(length: int, captured: int, total: int) -> bool:
    """The first packet's declared length agrees with what was seen of the request."""
    end = 4 + length
    if end > total:
        return False
    # Fully captured: either it is the whole request or another header follows it.
    return end == captured or end + 4 <= captured or captured < total


def _reply_seq_ok(response: bytes, want: int) -> bool:
    return len(response) < 4 or response[3] == want


def looks_like_command(request: bytes, req_bytes: int, response: bytes = b"") -> bool:
    """A client command packet: sequence id 0, a known command byte, a length that fits, and
    (when there is one) a response that starts with sequence id 1 (or 1 of a later command)."""
    head = _first_header(request)
    if head is None:
        return False
    length, seq = head
    code = request[4]
    if seq != 0 or length == 0 or code not in CMD_NAMES:
        return False
    if not _length_fits(length, len(request), max(req_bytes, len(request))):
        return False
    if code in NO_RESPONSE or code == COM_QUIT:
        return True  # its reply, if any, belongs to a later command in the same buffer
    return _reply_seq_ok(response, 1)


def looks_like_handshake_response(request: bytes, response: bytes = b"") -> bool:
    """A HandshakeResponse41 (or SSLRequest): sequence id 1, CLIENT_PROTOCOL_41, the 19 zero
    bytes of filler; the server's answer, if any, has sequence id 2."""
    head = _first_header(request)
    if head is None or len(request) < 36:
        return False
    length, seq = head
    if seq != 1 or length < 32:
        return False
    caps = int.from_bytes(request[4:8], "little")
    if not caps & CLIENT_PROTOCOL_41:
        return False
    if request[13:32] != bytes(19):
        return False
    if length == 32 and caps & CLIENT_SSL:
        return True  # an SSLRequest: the server answers with a TLS handshake, not a packet
    return _reply_seq_ok(response, 2)


def looks_like_auth_continuation(request: bytes, response: bytes) -> bool:
    """A later packet of the authentication dialogue (auth-switch reply, sha2 exchange): one
    whole packet with a sequence id of 3 or more, answered with the next sequence id."""
    head = _first_header(request)
    if head is None or len(response) < 4:
        return False
    length, seq = head
    return 3 <= seq < 16 and 4 + length == len(request) and response[3] == (seq + 1) & 0xFF


# --- parsing --------------------------------------------------------------------------------


def parse_handshake_response(request: bytes) -> Handshake | None:
    """Decode a HandshakeResponse41 from the start of a request buffer."""
    packets = split_packets(request, limit=1)
    if not packets:
        return None
    p = packets[0].payload
    if len(p) < 32:
        return None
    caps = int.from_bytes(p[0:4], "little")
    ext = int.from_bytes(p[28:32], "little")
    mariadb = not caps & CLIENT_MYSQL and ext != 0
    if len(p) == 32:  # an SSLRequest: the rest of the handshake is inside TLS
        return Handshake(caps, None, None, None, mariadb)
    username, i = _cstr(p, 32)
    if username is None:
        return Handshake(caps, None, None, None, mariadb)
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        alen, i = _lenenc(p, i)
    elif caps & CLIENT_SECURE_CONNECTION:
        alen, i = (p[i], i + 1) if i < len(p) else (None, i)
    else:
        end = p.find(b"\0", i)
        alen = None if end < 0 else end - i + 1
    if alen is None or i + alen > len(p):
        return Handshake(caps, username, None, None, mariadb)
    i += alen
    database = None
    if caps & CLIENT_CONNECT_WITH_DB:
        database, i = _cstr(p, i)
        if database == "":
            database = None
    plugin = None
    if caps & CLIENT_PLUGIN_AUTH:
        plugin, i = _cstr(p, i)
    return Handshake(caps, username, database, plugin, mariadb)


def parse_request(request: bytes, capabilities: int = 0) -> list[Command]:
    """The commands in a request buffer, in order.

    A packet with sequence id 0 starts a command; later packets of the same command (the tail
    of a payload of 16 MiB or more, LOAD DATA LOCAL contents) are skipped. Parsing stops at
    the first packet that is not a known command. ``capabilities`` (from the handshake) says
    whether COM_QUERY carries MySQL 8 query attributes before the text.
    """
    out: list[Command] = []
    for pkt in split_packets(request):
        if pkt.seq != 0:
            if not out:
                break
            continue
        if not pkt.payload or pkt.payload[0] not in CMD_NAMES:
            break
        code = pkt.payload[0]
        args = pkt.payload[1:]
        if code == COM_QUERY and capabilities & CLIENT_QUERY_ATTRIBUTES:
            args = _skip_query_attributes(args)
        out.append(Command(code, args, pkt.complete))
    return out


def _skip_query_attributes(args: bytes) -> bytes:
    count, i = _lenenc(args, 0)
    _sets, i = _lenenc(args, i)
    if count == 0:
        return args[i:]
    return b""  # typed attribute values precede the text: not worth decoding here


def split_replies(response: bytes) -> list[list[Packet]]:
    """The response buffer cut into one packet list per answered command: a packet whose
    sequence id is 1 starts the next answer (within one answer the ids count up from 1)."""
    out: list[list[Packet]] = []
    for pkt in split_packets(response):
        if pkt.seq == 1 or not out:
            out.append([pkt])
        else:
            out[-1].append(pkt)
    return out


def parse_reply(packets: list[Packet], command: int = COM_QUERY) -> Reply:
    """Classify the answer to ``command`` from its first packet."""
    if not packets or not packets[0].payload:
        return Reply("unknown")
    p = packets[0].payload
    head = p[0]
    if head == 0xFF:
        code = int.from_bytes(p[1:3], "little") if len(p) >= 3 else None
        state = None
        msg_at = 3
        if len(p) >= 9 and p[3:4] == b"#":
            state = p[4:9].decode("ascii", "replace")
            msg_at = 9
        message = p[msg_at : msg_at + 512].decode("utf-8", "replace") or None
        return Reply("err", error_code=code, sql_state=state, message=message)
    if command == COM_STMT_PREPARE:
        if head == 0x00 and len(p) >= 5:
            return Reply("ok", statement_id=int.from_bytes(p[1:5], "little"))
        return Reply("unknown")
    if head == 0x00 and (packets[0].length >= 7 or command != COM_QUERY):
        return Reply("ok")
    if head == 0xFE and packets[0].length < 9:
        return Reply("eof")
    if command in (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_FETCH):
        if head == 0xFB:
            return Reply("local_infile")
        count, _ = _lenenc(p, 0)
        if count:
            return Reply("result_set", column_count=count)
    if command == COM_CHANGE_USER and head in (0x01, 0xFE):
        return Reply("auth")
    return Reply("unknown")


GREETING_PROTOCOL: Final = 10
"""HandshakeV10, the first packet a MySQL or MariaDB server sends on a new connection."""


def parse_greeting(response: bytes) -> str | None:
    """The server version a server's greeting announces (``8.0.36``,
    ``5.5.5-10.11.6-MariaDB-0+deb12u1``), or None when ``response`` is not a greeting: sequence
    id 0, protocol 10, then the version as a NUL-terminated printable string inside the
    packet."""
    if len(response) < 7 or response[3] != 0 or response[4] != GREETING_PROTOCOL:
        return None
    length = int.from_bytes(response[:3], "little")
    end = response.find(b"\0", 5, 4 + length)
    if end <= 5:
        return None
    version = response[5:end]
    if not version.isascii() or not version.decode("ascii").isprintable():
        return None
    return version.decode("ascii")


def vendor_of_server_version(version: str) -> str:
    """``"mariadb"`` when a greeting's version says MariaDB (MariaDB prefixes its own version
    with ``5.5.5-`` for old clients, but always names itself), else ``"mysql"``."""
    return "mariadb" if "mariadb" in version.lower() else "mysql"


def vendor_of_server_executable(name: str) -> str | None:
    """``"mariadb"`` when a server's executable name proves MariaDB (``mariadbd``, and
    ``mariadb-*`` wrappers), else None: ``mysqld`` is MySQL's name but also MariaDB's before
    10.5, so it proves nothing."""
    return "mariadb" if name.startswith("mariadb") else None
