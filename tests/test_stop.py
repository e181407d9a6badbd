import random

import pytest

from rapidserve.sampling import StopMatch, find_stop, hold_back


def _final_text(prev: str, delta: str, stops, include=False) -> str | None:
    hit = find_stop(prev, delta, stops, include)
    return None if hit is None else (prev + delta)[: hit.cut]


def test_stop_inside_delta():
    assert find_stop("Hello", " world. Bye", ["."]) == StopMatch(".", 11)
    assert _final_text("Hello", " world. Bye", ["."]) == "Hello world"


def test_stop_spanning_two_deltas():
    hit = find_stop("Hello wor", "ld! more", ["world"])
    assert hit == StopMatch("world", 6)
    assert _final_text("Hello wor", "ld! more", ["world"]) == "Hello "


def test_stop_spanning_many_deltas():
    prev = ""
    hit = None
    for delta in ["The ", "E", "N", "D", " of it"]:
        hit = find_stop(prev, delta, ["END"])
        if hit:
            break
        prev += delta
    assert hit == StopMatch("END", 4)
    assert (prev + delta)[: hit.cut] == "The "


def test_stop_at_start():
    assert find_stop("", "STOP and more", ["STOP"]) == StopMatch("STOP", 0)
    assert _final_text("", "STOP and more", ["STOP"]) == ""


def test_include_stop_str_in_output():
    assert _final_text("Hello wor", "ld! more", ["world"], include=True) == "Hello world"
    assert _final_text("", "STOP and more", ["STOP"], include=True) == "STOP"


def test_no_stop():
    assert find_stop("Hello", " world", ["xyz", "!"]) is None
    assert find_stop("Hello", " world", []) is None
    assert find_stop("Hello.", "", ["."]) is None  # nothing new


def test_old_match_not_reported_again():
    # "stop" lies entirely in text checked on an earlier step.
    assert find_stop("a stop b", "c", ["stop"]) is None


def test_multiple_stops_earliest_wins():
    assert find_stop("", "a, b. c", [".", ","]) == StopMatch(",", 1)
    assert find_stop("", "a, b. c", [",", "."]) == StopMatch(",", 1)
    assert _final_text("x", "yz END here. More", [".", "END"]) == "xyz "


def test_stop_that_completes_first_wins():
    # Streamed one character at a time, "bc" completes before "abcd" does.
    assert find_stop("", "abcd", ["abcd", "bc"]) == StopMatch("bc", 1)
    # Same end: the longer stop (earlier start) wins, so no part of a stop leaks out.
    assert find_stop("", "xabc", ["c", "abc"]) == StopMatch("abc", 1)
    assert find_stop("", "xabc", ["c", "abc"], True) == StopMatch("abc", 4)


def test_nothing_after_stop_is_kept():
    for include in (False, True):
        text = _final_text("one two", " STOP three STOP four", ["STOP"], include)
        assert "three" not in text and "four" not in text


def _char_by_char(text: str, stops, include: bool) -> str:
    for i in range(len(text)):
        hit = find_stop(text[:i], text[i], stops, include)
        if hit is not None:
            return text[: hit.cut]
    return text


def _reference(text: str, stops, include: bool) -> str:
    """Brute force: the first position where some stop ends, longest stop on a tie."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end] if include else text[: end - len(stop)]
    return text


def test_result_independent_of_chunking():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        expected = _reference(text, stops, include)
        assert _char_by_char(text, stops, include) == expected
        # Random chunking gives the same final text.
        prev, out, i = "", text, 0
        while i < len(text):
            delta = text[i : i + rng.randint(1, 6)]
            hit = find_stop(prev, delta, stops, include)
            if hit is not None:
                out = (prev + delta)[: hit.cut]
                break
            prev += delta
            i += len(delta)
        assert out == expected, (text, stops, include)


# ---- hold_back ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stops, n",
    [
        ("Hello wor", ["world"], 3),
        ("Hello w", ["world"], 1),
        ("Hello", ["world"], 0),
        ("Hello", [], 0),
        ("Hello", ["."], 0),  # a one-character stop is never pending
        ("", ["abc"], 0),
        ("xab", ["abc", "bcd", "b"], 2),
        ("xab", ["bz", "abc"], 2),
        ("aaa", ["aaaa"], 3),
        ("ab", ["abcdef"], 2),
    ],
)
def test_hold_back(text, stops, n):
    assert hold_back(text, stops) == n


def test_streaming_with_hold_back_never_sends_cut_text():
    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        prev, sent, final, i = "", "", None, 0
        while i < len(text):
            delta = text[i : i + rng.randint(1, 5)]
            i += len(delta)
            hit = find_stop(prev, delta, stops)
            if hit is not None:
                final = (prev + delta)[: hit.cut]
                break
            prev += delta
            safe = prev[: len(prev) - hold_back(prev, stops)]
            assert safe.startswith(sent)
            sent = safe
        if final is None:
            final = prev
        assert final.startswith(sent), (text, stops, sent, final)
