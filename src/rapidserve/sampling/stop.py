"""Stop-string detection on incrementally decoded text (pure functions, no state).

Usage per decode step, with `prev_text` = the request's output text before this step:

    hit = find_stop(prev_text, delta, params.stop, params.include_stop_str_in_output)
    if hit is not None:                    # finished; the output text is
        text = (prev_text + delta)[: hit.cut]

Which stop wins when several occur: the one that *completes* first, i.e. the match with
the smallest end position, and among matches ending at the same place the longest one
(the earliest start). That is what a character-by-character stream would have stopped on,
so the outcome does not depend on how the text happened to be split into deltas.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class StopMatch(NamedTuple):
    """A stop string found by `find_stop`.

    stop: the stop string that matched.
    cut: how many characters of `prev_text + delta` the output keeps: the stop's start, or
        its end with include_stop_str_in_output. It can be less than len(prev_text) when the
        stop began in earlier text (see `hold_back` for not streaming such text early).
    """

    stop: str
    cut: int


def find_stop(
    prev_text: str,
    delta: str,
    stops: Sequence[str],
    include_stop_str_in_output: bool = False,
) -> StopMatch | None:
    """The stop string that appending `delta` to `prev_text` completes, or None.

    Only matches that end inside `delta` are new (earlier ones were reported on earlier
    steps), so for each stop the search starts len(stop) - 1 characters before the delta.
    """
    if not delta or not stops:
        return None
    # Enough earlier text for the longest stop to straddle the delta boundary.
    window_start = max(0, len(prev_text) - (max(len(s) for s in stops) - 1))
    window = prev_text[window_start:] + delta

    best_stop: str | None = None
    best_start = best_end = 0
    for stop in stops:
        if not stop:
            continue
        search_from = max(0, len(prev_text) - len(stop) + 1) - window_start
        idx = window.find(stop, search_from)
        if idx < 0:
            continue
        start = window_start + idx
        end = start + len(stop)
        if best_stop is None or end < best_end or (end == best_end and start < best_start):
            best_stop, best_start, best_end = stop, start, end
    if best_stop is None:
        return None
    return StopMatch(best_stop, best_end if include_stop_str_in_output else best_start)


def hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` a streamer must not send yet.

    That is the longest suffix of `text` that is a proper prefix of some stop string: those
    characters would be cut if the next delta completes the stop. `text` is assumed to
    contain no complete stop (check with `find_stop` first). With
    include_stop_str_in_output nothing ever needs holding back, since text before a stop's
    end is always kept.
    """
    longest = 0
    for stop in stops:
        # Only suffixes longer than the best so far can improve it.
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
