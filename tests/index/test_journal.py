"""The write-ahead journal: round trip, torn tails, corrupt records, truncation."""

from __future__ import annotations

import numpy as np

from asymret.index.journal import ADD, REMOVE, Journal

from .conftest import unit


def test_round_trip_and_torn_tail(tmp_path):
    journal = Journal(tmp_path / "j.bin")
    assert journal.read() == ([], 0) and journal.size() == 0
    vectors = unit(3, 4)
    journal.append(1, ADD, np.array([5, 6, 7]), vectors)
    second = journal.append(2, REMOVE, np.array([6]))
    records, valid = journal.read()
    assert [(r.seq, r.kind, r.ids.tolist()) for r in records] == [(1, ADD, [5, 6, 7]), (2, REMOVE, [6])]
    np.testing.assert_array_equal(records[0].vectors, vectors)
    assert records[1].vectors is None and valid == journal.size()
    # a crash mid-append leaves part of a record: everything before it still reads
    with open(journal.path, "ab") as f:
        f.write(b"AJR1" + b"\x03" * 11)
    records, valid = journal.read()
    assert [r.seq for r in records] == [1, 2] and valid < journal.size()
    journal.truncate(second)  # undo the second append
    assert [r.seq for r in journal.read()[0]] == [1]


def test_a_flipped_byte_ends_the_journal(tmp_path):
    journal = Journal(tmp_path / "j.bin")
    journal.append(1, ADD, np.array([1]), unit(1, 4))
    start = journal.append(2, ADD, np.array([2]), unit(1, 4, seed=1))
    journal.append(3, REMOVE, np.array([1]))
    data = bytearray(journal.path.read_bytes())
    data[start + 30] ^= 0xFF  # inside record 2's vector
    journal.path.write_bytes(bytes(data))
    records, valid = journal.read()
    assert [r.seq for r in records] == [1] and valid == start
