"""SQL text helpers shared by the database protocols: obfuscation, operation and collection names.

Everything here is a single left-to-right scan (linear in the input), works on truncated or
malformed text, and never raises: a query captured from the wire is untrusted bytes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

_IDENT_START: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789$")
_DIGITS: Final = frozenset("0123456789")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

# `IN (?, ?, ?)` -> `IN (?)`. Bounded by the literal shapes only (no nested quantifiers), so linear.
_IN_LIST: Final = re.compile(r"(?i)\bIN\s*\(\s*\?(?:\s*,\s*\?)+\s*\)")
# VALUES (?, ?), (?, ?) is left as is: its shape carries the column count, not data.


def _skip_dollar_tag(q: str, i: int) -> str | None:
    """If ``q[i]`` starts a dollar-quote tag (``$$`` or ``$tag$``), return the tag."""
    n = len(q)
    j = i + 1
    if j < n and q[j] == "$":
        return "$$"
    if j < n and q[j] in _IDENT_START:
        j += 1
        while j < n and (q[j] in _IDENT_CHARS) and q[j] != "$":
            j += 1
        if j < n and q[j] == "$":
            return q[i : j + 1]
    return None


def obfuscate(query: str) -> str:
    """Replace literals (strings, numbers, hex/bit strings, dollar-quoted) with ``?``.

    Identifiers (double-quoted or backquoted), keywords, placeholders (``$1``, ``?``, ``%s``)
    and comments' absence of data are preserved; comments are dropped. ``IN (?, ?, ...)`` lists
    collapse to ``IN (?)``. An unterminated literal (truncated capture) becomes one ``?``.
    """
    try:
        return _IN_LIST.sub("IN (?)", _obfuscate(query))
    except Exception:  # pragma: no cover - defensive: never fail a span on odd text
        return "?"


def _obfuscate(q: str) -> str:
    out: list[str] = []
    n = len(q)
    i = 0
    while i < n:
        c = q[i]
        # String literals, with E'' / N'' / B'' / X'' / U&'' prefixes.
        if c == "'" or (
            c in "eEnNbBxX" and i + 1 < n and q[i + 1] == "'"
            and (i == 0 or q[i - 1] not in _IDENT_CHARS)
        ):
            j = i + 1 if c == "'" else i + 2
            backslash = c in "eE" or c == "'"  # MySQL-style escapes are common; harmless for PG
            while j < n:
                ch = q[j]
                if backslash and ch == "\\":
                    j += 2
                    continue
                if ch == "'":
                    if j + 1 < n and q[j + 1] == "'":
                        j += 2
                        continue
                    j += 1
                    break
                j += 1
            out.append("?")
            i = j
            continue
        if c == '"' or c == "`":
            j = q.find(c, i + 1)
            j = n if j < 0 else j + 1
            out.append(q[i:j])
            i = j
            continue
        if c == "-" and q.startswith("--", i):
            j = q.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "#" and (i == 0 or q[i - 1] in " \t\n\r"):  # MySQL comment
            j = q.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and q.startswith("/*", i):
            j = q.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
            continue
        if c == "$":
            tag = _skip_dollar_tag(q, i)
            if tag is not None:
                j = q.find(tag, i + len(tag))
                i = n if j < 0 else j + len(tag)
                out.append("?")
                continue
            # $1 placeholder: keep.
            j = i + 1
            while j < n and q[j] in _DIGITS:
                j += 1
            out.append(q[i:j])
            i = j
            continue
        if c in _DIGITS or (c == "." and i + 1 < n and q[i + 1] in _DIGITS):
            # A digit right after an identifier char is part of it (t1). Not a '.': that
            # branch would not advance (a.5 hung the agent; found by fuzz/fuzz_sql.py).
            if c != "." and i > 0 and q[i - 1] in _IDENT_CHARS:
                j = i
                while j < n and q[j] in _IDENT_CHARS:
                    j += 1
                out.append(q[i:j])
                i = j
                continue
            j = i
            if c == "0" and i + 1 < n and q[i + 1] in "xX":
                j = i + 2
                while j < n and q[j] in _HEX:
                    j += 1
            else:
                while j < n and (q[j] in _DIGITS or q[j] == "."):
                    j += 1
                if j < n and q[j] in "eE":
                    k = j + 1
                    if k < n and q[k] in "+-":
                        k += 1
                    if k < n and q[k] in _DIGITS:
                        j = k
                        while j < n and q[j] in _DIGITS:
                            j += 1
            out.append("?")
            i = j
            continue
        if c in _IDENT_START:
            j = i + 1
            while j < n and q[j] in _IDENT_CHARS:
                j += 1
            word = q[i:j]
            out.append(word)
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


# --- operation / collection --------------------------------------------------------------------

_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_MAIN_VERBS: Final = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"})


def _strip_leading(q: str) -> str:
    """Drop leading whitespace, comments and opening parentheses."""
    i = 0
    n = len(q)
    while i < n:
        c = q[i]
        if c in " \t\r\n(;":
            i += 1
        elif q.startswith("--", i):
            j = q.find("\n", i)
            i = n if j < 0 else j + 1
        elif q.startswith("/*", i):
            j = q.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return q[i:]


def operation_name(query: str) -> str | None:
    """The statement's verb, uppercased (``SELECT``, ``INSERT``, ``BEGIN`` ...), or None.

    ``WITH ... SELECT`` gives the main statement's verb when it can be found at parenthesis
    depth 0 after the CTEs, else ``WITH``.
    """
    try:
        q = _strip_leading(query)
        m = _WORD.match(q)
        if m is None:
            return None
        verb = m.group(0).upper()
        if verb != "WITH":
            return verb
        main = _main_after_with(q)
        return main if main is not None else "WITH"
    except Exception:  # pragma: no cover - defensive
        return None


def _main_after_with(q: str) -> str | None:
    """Find the first main verb at depth 0 after a ``WITH`` clause (literals already skipped)."""
    text = _obfuscate(q)
    depth = 0
    i = 4
    n = len(text)
    while i < n:
        c = text[i]
        if c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth = max(0, depth - 1)
            i += 1
        elif c in _IDENT_START:
            j = i + 1
            while j < n and text[j] in _IDENT_CHARS:
                j += 1
            if depth == 0:
                w = text[i:j].upper()
                if w in _MAIN_VERBS:
                    return w
            i = j
        elif c == '"':
            j = text.find('"', i + 1)
            i = n if j < 0 else j + 1
        else:
            i += 1
    return None


_TABLE_AFTER: Final = {
    "SELECT": "FROM",
    "DELETE": "FROM",
    "INSERT": "INTO",
    "REPLACE": "INTO",
    "UPDATE": None,  # the table follows the verb
    "TRUNCATE": None,
    "CREATE": "TABLE",
    "DROP": "TABLE",
    "ALTER": "TABLE",
}
_QUALIFIED: Final = r'(?:"[^"]{1,128}"|`[^`]{1,128}`|[A-Za-z_][A-Za-z0-9_$]{0,127})'
_NAME: Final = re.compile(rf"\s*({_QUALIFIED}(?:\s*\.\s*{_QUALIFIED}){{0,2}})")
_SKIP_WORDS: Final = frozenset({"ONLY", "TABLE", "IF", "NOT", "EXISTS", "LOW_PRIORITY",
                                "IGNORE", "QUICK", "DELAYED", "TEMPORARY", "TEMP", "UNLOGGED"})
_WS_WORD: Final = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_$]*)")
_STOP_JOIN: Final = re.compile(r"(?i)\bJOIN\b|,")


def collection_name(query: str) -> str | None:
    """The single table a simple statement works on (after FROM / INTO / UPDATE / TABLE).

    Returns None for joins, multi-table FROM lists, subqueries, CTEs and anything unclear.
    Quotes are kept off the returned name's parts (``"Users"`` -> ``Users``).
    """
    try:
        return _collection(query)
    except Exception:  # pragma: no cover - defensive
        return None


def _collection(query: str) -> str | None:
    q = _strip_leading(query)
    m = _WORD.match(q)
    if m is None:
        return None
    verb = m.group(0).upper()
    if verb not in _TABLE_AFTER:
        return None
    text = _obfuscate(q)
    keyword = _TABLE_AFTER[verb]
    if keyword is None:
        pos = m.end()
    else:
        km = re.search(rf"(?i)\b{keyword}\b", text)
        if km is None:
            return None
        pos = km.end()
        if verb in ("CREATE", "DROP", "ALTER") and not re.match(
            rf"(?i){verb}\s+(?:(?:GLOBAL|LOCAL|TEMP|TEMPORARY|UNLOGGED)\s+)*TABLE\b", text
        ):
            return None
    # Skip modifiers (ONLY, IF NOT EXISTS, ...).
    while True:
        wm = _WS_WORD.match(text, pos)
        if wm is None or wm.group(1).upper() not in _SKIP_WORDS:
            break
        pos = wm.end()
    nm = _NAME.match(text, pos)
    if nm is None:
        return None
    rest = text[nm.end():]
    # SELECT/DELETE: reject joins and comma lists in the FROM clause.
    if verb in ("SELECT", "DELETE"):
        clause = re.split(r"(?i)\b(?:WHERE|GROUP|ORDER|LIMIT|HAVING|UNION|FOR|RETURNING|OFFSET|"
                          r"FETCH|WINDOW|INTERSECT|EXCEPT)\b|;|\)", rest, maxsplit=1)[0]
        if _STOP_JOIN.search(clause):
            return None
        if "(" in text[:pos] and verb == "SELECT" and _paren_before(text, pos):
            return None  # FROM inside a subquery / function call
    name = nm.group(1)
    parts = [p.strip().strip('"`') for p in name.split(".")]
    return ".".join(parts) if all(parts) else None


def _paren_before(text: str, pos: int) -> bool:
    """Whether ``pos`` sits inside an unclosed parenthesis."""
    return text.count("(", 0, pos) > text.count(")", 0, pos)


@lru_cache(maxsize=2048)
def describe(query: str, raw: bool) -> tuple[str, str | None, str | None]:
    """(text for ``db.query.text``: ``query`` itself when ``raw``, else obfuscated; operation;
    collection) of one SQL text. Cached: an app sends the same few statements again and again,
    and obfuscating one took most of a MySQL span's parse cost."""
    text = query if raw else obfuscate(query)
    return text, operation_name(query), collection_name(query)
