"""The `rapidserve` command line: help text and defaults on every flag, --log-level anywhere,
vLLM's flag names (built ones work, unbuilt ones are refused by name), --chat-template, and the
offline API's prompt forms."""

from __future__ import annotations

import argparse

from types import SimpleNamespace

import pytest

from rapidserve import SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.serving.front import EngineFront, load_chat_template
from rapidserve.entrypoints import cli
from rapidserve.entrypoints.args import engine_config_from_args, served_names
from rapidserve.entrypoints.cli import build_parser
from rapidserve.entrypoints.llm import LLM, _engine_prompt


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


ALL_PARSERS = list(_parsers(build_parser()))


@pytest.mark.parametrize("path,parser", ALL_PARSERS, ids=[" ".join(p) or "rapidserve" for p, _ in ALL_PARSERS])
def test_every_flag_has_help_and_shows_its_default(path, parser):
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"rapidserve {' '.join(path)} {action.option_strings}: no help text"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, [], ()):
            assert "default" in parser._get_formatter()._get_help_string(action), (path, action.option_strings)
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            assert "{" + ",".join(map(str, action.choices)) + "}" in text.replace("\n", "").replace(" ", "")


def test_help_shows_defaults_and_choices():
    text = " ".join(dict(ALL_PARSERS)[("serve",)].format_help().split())
    assert "--port PORT TCP port" in text and "(default: 8000)" in text
    assert "(default: 256)" in text  # --max-num-seqs
    assert "{hybrid,rapid,disagg}" in text


@pytest.mark.parametrize("argv,level", [
    (["--log-level", "debug", "generate"], "DEBUG"),
    (["generate", "--log-level", "ERROR"], "ERROR"),
    (["bench", "sweep", "--log-level", "info"], "INFO"),
    (["--log-level", "INFO", "serve", "--log-level", "DEBUG"], "DEBUG"),  # the later one wins
    (["generate"], None),  # main() then picks WARNING; serve gets INFO
])
def test_log_level_before_or_after_the_subcommand(argv, level):
    assert build_parser().parse_args(argv).log_level == level


def test_log_level_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--log-level", "LOUD"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["-tp", "2"], "tensor parallelism is not built"),
    (["--tensor-parallel-size", "4"], "tensor parallelism is not built"),
    (["--enable-prefix-caching"], "prefix caching is not built"),
])
def test_unbuilt_vllm_flags_are_refused_by_name(flags, message, capsys):
    # main() refuses before any model is loaded, exit status 2 as argparse's own errors.
    assert cli.main(["generate", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "unrecognized" not in err


def test_quantization_methods_not_built_are_refused_with_the_choices(capsys):
    # fp8 is built (docs/quantization.md); other methods are named in the error with the choices.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--quantization", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err
    args = build_parser().parse_args(["generate", "-q", "fp8", "--kv-cache-dtype", "fp8"])
    assert (args.quantization, args.kv_cache_dtype) == ("fp8", "fp8")


def test_built_vllm_flags_are_accepted():
    args = build_parser().parse_args([
        "serve", "--served-model-name", "a", "b", "--dtype", "float", "--num-gpu-blocks-override", "7",
        "--trust-remote-code", "-tp", "1", "--kv-cache-dtype", "auto", "--no-enable-prefix-caching",
        "--chat-template", "{{ messages[0].content }}", "--device", "cpu",
    ])
    config = engine_config_from_args(args)
    assert config.served_model_name == "a" and served_names(args) == ("a", "b")
    assert config.dtype == "float32" and config.num_kv_blocks == 7
    assert config.chat_template == "{{ messages[0].content }}"


def test_chat_template_from_a_file_or_inline(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert load_chat_template(str(f)).startswith("{% for m in messages %}")
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_chat_template("{% for m in messages %}")


def _word_tokenizer():
    """A small word-level HF tokenizer without a chat template (fast to build)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<<", ">>", "|", "user", "Hi", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_chat_template_is_used_by_chat():
    template = "{% for m in messages %}<< {{ m.role }} | {{ m.content }} >>{% endfor %}"
    front = EngineFront(EngineConfig(chat_template=template))
    front.tokenizer = _word_tokenizer()
    front.model_config = SimpleNamespace(vocab_size=front.tokenizer.vocab_size)  # ids are checked against it
    ids = front.chat_prompt([{"role": "user", "content": "Hi there"}])
    assert ids == front.tokenizer.encode("<< user | Hi there >>", add_special_tokens=False)
    assert 0 not in ids  # no unknown word: the template's text, not something else
    plain = EngineFront(EngineConfig())
    plain.tokenizer = front.tokenizer  # has no template of its own
    with pytest.raises(ValueError, match="no chat template: give one with --chat-template"):
        plain.chat_prompt([{"role": "user", "content": "Hi there"}])


# ---- the offline API's prompt forms ----------------------------------------------------------


def test_vllm_prompt_forms_are_read():
    assert _engine_prompt("hi", 0) == "hi"
    assert _engine_prompt({"prompt": "hi"}, 0) == "hi"
    assert _engine_prompt({"prompt_token_ids": (1, 2)}, 0) == [1, 2]
    assert _engine_prompt([1, 2], 0) == [1, 2]
    with pytest.raises(ValueError, match=r"prompts\[3\].*multi_modal_data"):
        _engine_prompt({"prompt": "hi", "multi_modal_data": {}}, 3)
    with pytest.raises(ValueError, match=r"prompts\[0\]: expected a string"):
        _engine_prompt(3.5, 0)


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return LLM(tiny, device="cpu", num_kv_blocks=64, trust_remote_code=True, tensor_parallel_size=1,
               served_model_name=["tiny", "alias"])


def test_generate_takes_every_prompt_form(tiny_llm):
    assert tiny_llm.engine.model_name == "tiny"
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ids = [5, 6, 7, 8]
    outs = tiny_llm.generate([ids, {"prompt_token_ids": ids}], params)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids and len(outs[0].outputs[0].token_ids) == 4
    bare = tiny_llm.generate({"prompt_token_ids": ids}, params)
    assert bare[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_llm_refuses_unbuilt_vllm_options(tiny):
    with pytest.raises(ValueError, match="awq"):
        LLM(tiny, device="cpu", quantization="awq")
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(tiny, device="cpu", tensor_parallel_size=2)


def test_demo_simulates_the_modes_then_answers_with_the_rapid_mode(tmp_path, capsys):
    """The README's main job, end to end (fewer simulated requests)."""
    assert cli.main(["demo", "--num-prompts", "12", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for config in ("hybrid-512", "hybrid-2048", "disagg", "rapid-rapid"):
        assert config in out
    assert "A: " in out and "Paris" in out.split("A: ", 1)[1]
    assert (tmp_path / "sweep.json").exists()
