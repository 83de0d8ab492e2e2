"""The shared SQL helpers: obfuscation, operation and collection names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_side.protocols.sql import collection_name, obfuscate, operation_name
from tests.unit._work import assert_linear


@pytest.mark.parametrize(("query", "expected"), [
    ("SELECT * FROM users WHERE id = 5", "SELECT * FROM users WHERE id = ?"),
    ("SELECT * FROM t WHERE name = 'bob''s' AND x = 'a\\'b'",
     "SELECT * FROM t WHERE name = ? AND x = ?"),
    ("select 1.5e3, -2, .5, 0x1F", "select ?, -?, ?, ?"),
    ("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (?)"),
    ("SELECT * FROM t WHERE id in ( 'a' ,'b' )", "SELECT * FROM t WHERE id IN (?)"),
    ("SELECT $$it's$$, $tag$x $$ y$tag$", "SELECT ?, ?"),
    ("SELECT E'\\n', B'0101', X'ff', N'x'", "SELECT ?, ?, ?, ?"),
    ("SELECT a FROM t1 WHERE b = $1", "SELECT a FROM t1 WHERE b = $1"),
    ('SELECT "col 5" FROM "T2"', 'SELECT "col 5" FROM "T2"'),
    ("SELECT 1 -- secret 42\n", "SELECT ? \n"),
    ("SELECT /* 42 */ 1", "SELECT   ?"),
    ("SELECT 'unterminated", "SELECT ?"),
    ("", ""),
])
def test_obfuscate(query: str, expected: str) -> None:
    assert obfuscate(query) == expected


@pytest.mark.parametrize(("query", "op", "coll"), [
    ("SELECT name FROM users WHERE id = 1", "SELECT", "users"),
    ("  select count(*) from pgbench_accounts", "SELECT", "pgbench_accounts"),
    ("SELECT a FROM public.t1 WHERE b = $1", "SELECT", "public.t1"),
    ("SELECT * FROM a JOIN b ON a.id = b.id", "SELECT", None),
    ("SELECT * FROM a, b", "SELECT", None),
    ("SELECT * FROM (SELECT 1) AS s", "SELECT", None),
    ("SELECT 1", "SELECT", None),
    ("INSERT INTO users (id) VALUES (1)", "INSERT", "users"),
    ('UPDATE "Users" SET a = 1', "UPDATE", "Users"),
    ("DELETE FROM ONLY orders WHERE id = 3", "DELETE", "orders"),
    ("CREATE TABLE IF NOT EXISTS foo (a int)", "CREATE", "foo"),
    ("CREATE INDEX i ON foo (a)", "CREATE", None),
    ("DROP TABLE foo", "DROP", "foo"),
    ("TRUNCATE pgbench_history", "TRUNCATE", "pgbench_history"),
    ("begin", "BEGIN", None),
    ("COMMIT", "COMMIT", None),
    ("/* hint */ (SELECT 1)", "SELECT", None),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT", None),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", "INSERT", None),
    ("WITH RECURSIVE", "WITH", None),
    ("", None, None),
    ("42", None, None),
])
def test_operation_and_collection(query: str, op: str | None, coll: str | None) -> None:
    assert operation_name(query) == op
    assert collection_name(query) == coll


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises(text: str) -> None:
    assert isinstance(obfuscate(text), str)
    op = operation_name(text)
    assert op is None or op.isupper() or op == op.upper()
    collection_name(text)


@pytest.mark.parametrize("unit", ["'", "$$", "0x", "IN (1,", "/*", "FROM ONLY ", "(", "a.", "--"])
def test_linear_on_adversarial_input(unit: str) -> None:
    def names(q: str) -> None:
        obfuscate(q)
        operation_name(q)
        collection_name(q)

    assert_linear(names, lambda k: "SELECT * FROM " + unit * k, 250)
