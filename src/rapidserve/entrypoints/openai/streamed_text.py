"""StreamedText: how much of a request's output text may be sent to a streaming client."""

from __future__ import annotations

from rapidserve.outputs import RequestOutput
from rapidserve.sampling.stop import hold_back
from rapidserve.sampling_params import SamplingParams


class StreamedText:
    """Turns successive outputs of one request into the text each chunk carries.

    NOTE: text once sent is never taken back, so the concatenation of the chunks equals the
    final text. A stop string cuts the output at its start, possibly in text produced by
    earlier steps; the trailing characters that could be the start of a stop string are
    therefore held back until a later token shows they are not (or the request ends).
    """

    def __init__(self, params: SamplingParams) -> None:
        # With include_stop_str_in_output the cut falls at a stop's end: nothing before it is
        # ever removed, so nothing needs holding back.
        self._stops = () if params.include_stop_str_in_output else params.stop
        self._sent = 0  # characters of the output text already sent

    def delta(self, output: RequestOutput) -> str:
        # (the output's one completion: a request's, or one choice's of a parallel request)
        c = output.outputs[0]
        text = c.text
        end = len(text) if c.finish_reason is not None else len(text) - hold_back(text, self._stops)
        if end <= self._sent:
            return ""
        delta = text[self._sent:end]
        self._sent = end
        return delta
