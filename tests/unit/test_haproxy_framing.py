"""Pipelined runtime-API answers cut per command, and the ids our `add server` gives (no I/O)."""

from __future__ import annotations

import pytest

from poolkeeper.backends.haproxy import SERVER_ID_BASE, server_id
from poolkeeper.backends.haproxy_client import AnswerSplitter
from poolkeeper.core.naming import member_name

# What HAProxy 2.6 sends back in prompt mode for: add server (ok), set server (nothing), a refused
# add, and a two-line `show servers state` of an empty backend.
STREAM = (b"New server registered.\n\n> "
          b"\n> "
          b"Already exists a server with the same name in backend web.\n\n> "
          b"1\n# be_id be_name srv_id\n\n> ")
ANSWERS = ["New server registered.", "", "Already exists a server with the same name in backend web.",
           "1\n# be_id be_name srv_id"]


def test_a_stream_in_one_chunk_is_one_answer_per_prompt() -> None:
    assert AnswerSplitter().feed(STREAM) == ANSWERS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_chunks_of_any_size_give_the_same_answers(size: int) -> None:
    """A prompt cut in two ("\\n" | "> ", or "\\n>" | " ") is found once both halves are in."""
    splitter = AnswerSplitter()
    answers = []
    for start in range(0, len(STREAM), size):
        answers += splitter.feed(STREAM[start:start + size])
    assert answers == ANSWERS
    assert splitter.pending == 0


def test_an_answer_is_given_only_when_its_prompt_arrived() -> None:
    splitter = AnswerSplitter()
    assert splitter.feed(b"New server reg") == []
    assert splitter.pending == len(b"New server reg")
    assert splitter.feed(b"istered.\n\n") == []
    assert splitter.feed(b">") == []
    assert splitter.feed(b" New") == ["New server registered."]
    assert splitter.pending == len(b"New")  # the prompt ends with its space; the next answer's start is kept


def test_a_greater_than_sign_inside_an_answer_is_no_prompt() -> None:
    assert AnswerSplitter().feed(b"a > b\n>c\n> ") == ["a > b\n>c"]


def test_thousands_of_answers_from_big_chunks() -> None:
    stream = b"New server registered.\n\n> " * 20_000
    splitter = AnswerSplitter()
    answers = []
    chunk = 1 << 16
    for start in range(0, len(stream), chunk):
        answers += splitter.feed(stream[start:start + chunk])
    assert len(answers) == 20_000 and set(answers) == {"New server registered."}


def test_undecodable_bytes_do_not_break_the_framing() -> None:
    assert AnswerSplitter().feed(b"\xff\xfe\n> ok\n> ") == ["\ufffd\ufffd", "ok"]


def test_server_ids_are_stable_in_range_and_above_haproxys_own() -> None:
    names = [member_name("shop", "web", f"uid-{i}") for i in range(10_000)]
    ids = [server_id(n) for n in names]
    assert ids == [server_id(n) for n in names]  # the same name gets the same id after a restart
    assert all(SERVER_ID_BASE <= i <= 2**31 - 1 for i in ids)  # HAProxy refuses 0 and 2**31
    assert len(set(ids)) >= len(ids) - 2  # clashes are rare (they are retried without an id)
