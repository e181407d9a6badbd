"""The docs stay true: the site builds in strict mode (no broken link or anchor), the
configuration reference is what the parsers give, and the examples of README.md and docs/*.md
run (the cheap ones, marked `<!-- example: run -->`) or at least parse (every `rapidserve`
command through the real parser, every bash block through `bash -n`, every python block through
compile())."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from rapidserve.entrypoints import cli
from rapidserve.entrypoints.cli_reference import render

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"(?:<!-- example: (?P<mark>\w+)[^>]*-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


class Example(NamedTuple):
    page: str
    line: int
    lang: str
    mark: str  # run, parse, compile, skip; "" when unmarked
    body: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _examples() -> list[Example]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group("lang") in ("bash", "sh", "python"):
                line = text.count("\n", 0, m.start("body"))
                out.append(Example(str(page.relative_to(ROOT)), line, m.group("lang"), m.group("mark") or "", m.group("body")))
    return out


EXAMPLES = _examples()


def _commands(body: str) -> list[list[str]]:
    """The argument lists of a bash block's commands (continuations joined, `&&` and `;` split,
    comments dropped; `...`, the docs' ellipsis, left out)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||"):
                if cmd:
                    commands.append(cmd)
                cmd = []
            elif w != "...":
                cmd.append(w)
    return commands


def _rapidserve_argv(cmd: list[str]) -> list[str] | None:
    if cmd[0] == "rapidserve" or cmd[0].endswith("/rapidserve"):
        return cmd[1:]
    return None


def test_examples_were_found():
    pages = {e.page for e in EXAMPLES}
    assert "README.md" in pages and "docs/user-guide.md" in pages
    assert sum(e.mark == "run" for e in EXAMPLES) >= 2


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_parses(example: Example):
    if example.mark == "skip":
        pytest.skip("marked skip")
    if example.lang == "python":
        compile(example.body, example.id, "exec")
        return
    subprocess.run(["bash", "-n"], input=example.body, text=True, check=True)
    for cmd in _commands(example.body):
        argv = _rapidserve_argv(cmd)
        if argv is not None:
            try:
                args = cli.build_parser().parse_args(argv)
            except SystemExit as e:
                if e.code == 0:  # --help
                    continue
                pytest.fail(f"{example.id}: {shlex.join(cmd)} does not parse (exit {e.code})")
            assert callable(args.func)
        elif cmd[0] == "bash" and len(cmd) > 1:
            assert (ROOT / cmd[1]).exists(), f"{example.id}: {cmd[1]} does not exist"


RUN = [e for e in EXAMPLES if e.mark == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_example_runs(example: Example, capsys):
    """The cheap examples, for real: each `rapidserve` command through cli.main in this process
    (the same code as the installed script), each python block executed."""
    if example.lang == "python":
        exec(compile(example.body, example.id, "exec"), {"__name__": "__example__"})
        assert capsys.readouterr().out.strip(), "the example printed nothing"
        return
    ran = 0
    for cmd in _commands(example.body):
        argv = _rapidserve_argv(cmd)
        assert argv is not None, f"{example.id}: only rapidserve commands can be marked run: {cmd}"
        assert cli.main(argv) == 0, shlex.join(cmd)
        ran += 1
    assert ran and capsys.readouterr().out.strip()


def test_site_builds_without_a_broken_link(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_configuration_reference_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run `python -m rapidserve.entrypoints.cli_reference`")


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "PLACEHOLDER" not in text
    # every relative link of the README points at a file of the repository
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to a missing {target}"
