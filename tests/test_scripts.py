"""The GPU evidence script is run only on a device machine: here its shell syntax and every
`rapidserve` command line in it are checked against the CLI's parser, so a renamed flag is
caught before device time is spent on it."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from rapidserve.entrypoints.cli import build_parser

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_evidence.sh"


def _commands() -> list[str]:
    """Each `$RS ...` command of the script, continuation lines joined, shell variables of the
    stage replaced by sample values."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    common = ""
    for line in text.splitlines():
        m = re.match(r'\s*common="([^"]*)"', line)
        if m:
            common = m.group(1)
        m = re.search(r"\$RS (.*?)(?: 2>&1|$)", line)
        if m:
            cmd = m.group(1)
            cmd = re.sub(r'"\$\{\w+:-([^}]*)\}"', lambda v: shlex.quote(v.group(1)), cmd)  # "${VAR:-default}": its default
            cmd = re.sub(r"\$\{\w+:-\}", "", cmd)  # ${VAR:-}: empty by default
            for var, value in (("$common", common), ('"$dir"', "/tmp/out/sweep"), ("$resume", "--resume"), ("${policy/:/_}", "static_40"), ("$policy", "static:40"),
                               ("$prof", "--profile /tmp/p.json"), ('"$sweep_profile"', "/tmp/p.json"), ('"$frontier_profile"', "/tmp/p.json"), ('"$OUT', '"/tmp/out'), ("$OUT", "/tmp/out"),
                               ("$n", "2048")):
                cmd = cmd.replace(var, value)
            out.append(cmd)
    return out


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("cmd", _commands())
def test_script_commands_parse(cmd):
    assert "$" not in cmd, f"an unreplaced shell variable in: {cmd}"
    args = build_parser().parse_args(shlex.split(cmd))
    assert callable(args.func)
