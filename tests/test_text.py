"""Text-level behaviour on the embedded SmolLM2: chat, stop strings, streaming, the CLI."""

import pytest

from rapidserve import SamplingParams
from rapidserve.entrypoints.cli import main

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm  # the session's embedded model (tests/conftest.py)


def test_chat_answers_sensibly(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_stop_string_cuts_exactly(llm):
    # The same chat prompt (as llm.chat renders it) under four sampling params, in one batch:
    # greedy decoding gives each the same tokens as alone, in a quarter of the decode steps.
    prompt = llm.engine.chat_prompt(QUESTION)
    params = [SamplingParams(temperature=0.0, max_tokens=20),
              SamplingParams(temperature=0.0, max_tokens=20, stop=["Paris"]),
              SamplingParams(temperature=0.0, max_tokens=20, stop=["Paris"], include_stop_str_in_output=True),
              # a stop string spanning tokens ("of France" is several tokens)
              SamplingParams(temperature=0.0, max_tokens=20, stop=["of Fra"])]
    full, cut, kept, span = (o.outputs[0] for o in llm.generate([prompt] * len(params), params))
    full = full.text
    assert "Paris" in full
    assert cut.text == full[: full.index("Paris")]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    assert kept.text == full[: full.index("Paris") + len("Paris")]
    assert span.text == full[: full.index("of Fra")]


def test_streamed_deltas_add_up_to_the_text(llm):
    eng = llm.engine
    # NOTE: 10 tokens: the reply is Japanese, two tokens per character except "、" (one), so
    # deltas are empty mid-character and the 10th token ends it mid-character (the final text
    # keeps the incomplete character as U+FFFD, as the tokenizer's decode does).
    rid = eng.add_request(eng.chat_prompt([{"role": "user", "content": "Say hello in Japanese and in Greek."}]),
                          SamplingParams(temperature=0.0, max_tokens=10))
    deltas, tokens, final = [], [], None
    while eng.has_unfinished_requests():
        for out in eng.step():
            deltas.append(out.delta_text)
            tokens += out.delta_token_ids
            final = out
    assert final is not None and final.request_id == rid and final.finished
    assert "".join(deltas) == final.outputs[0].text
    assert tokens == final.outputs[0].token_ids
    assert final.outputs[0].text == llm.tokenizer.decode(final.outputs[0].token_ids, skip_special_tokens=True)
    # what the 10 tokens are there for: characters split across tokens (empty deltas between
    # their halves) and a reply cut mid-character
    assert "" in deltas and any(len(d.encode()) > 1 for d in deltas), deltas
    assert final.outputs[0].text.endswith("\ufffd"), final.outputs[0].text


def test_chat_with_n_and_per_choice_stop_strings(llm):
    """LLM.chat: one RequestOutput per conversation, n completions, each detokenized and cut at
    its own stop string; a single request with the child's seed gives the same text."""
    messages = [{"role": "user", "content": "Write a word."}]
    params = SamplingParams(n=3, seed=3, temperature=1.0, max_tokens=8, stop=["e"])
    (out,) = llm.chat(messages, params)
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.prompt_token_ids
    for c in out.outputs:
        assert "e" not in c.text and c.finish_reason in ("stop", "length")
        assert c.stop_reason == ("e" if c.finish_reason == "stop" else None)
    single = llm.chat(messages, SamplingParams(seed=5, temperature=1.0, max_tokens=8, stop=["e"]))[0]
    assert single.outputs[0].text == out.outputs[2].text


def test_chat_without_messages_is_an_error(llm):
    with pytest.raises(ValueError, match="each message needs a string role"):
        llm.chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")


def test_cli_generate(capsys):
    assert main(["generate", "--device", "cpu", "--chat", "--max-tokens", "20",
                 "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_reports_bad_input(capsys):
    assert main(["generate", "--device", "cpu", "--model", "/no/such/model", "--prompt", "x"]) == 2
    assert "model not found" in capsys.readouterr().err
