"""The configuration reference (docs/configuration.md), rendered from the CLI's own parsers so it
cannot drift from them: every command, every flag, its default, its choices and its help.

    python -m rapidserve.entrypoints.cli_reference            # rewrite docs/configuration.md
    python -m rapidserve.entrypoints.cli_reference --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rapidserve.entrypoints.cli import build_parser

_HEADER = """# Configuration reference

Every command of `rapidserve` and every flag, with its default and choices. This page is
generated from the command line's parsers (`python -m rapidserve.entrypoints.cli_reference`;
a test fails when it is stale), so it says what the code does. The same text is in each
command's `--help`. The offline API, `LLM(...)`, takes the engine flags as keyword arguments
(`--max-num-seqs 64` is `max_num_seqs=64`). `--log-level` works before or after the command.
"""


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, its help line) for every parser that has flags of its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), sub, helps.get(name, "")
                yield from _commands(sub, path + (name,))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or d is False or d == []:
        return ""
    if isinstance(d, (list, tuple)):
        d = ",".join(map(str, d))
    return f"`{d}`"


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}` (positional)"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        names += f" {action.metavar or action.dest.upper()}"
    return names


_SHARED_GROUPS = ("engine", "vLLM flags not built yet (accepted, refused unless off)")


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| flag | default | choices | meaning |", "|---|---|---|---|"]
    for a in actions:
        choices = ", ".join(f"`{c}`" for c in a.choices) if a.choices else ""
        rows.append(f"| {_flag(a)} | {_default(a)} | {choices} | {_cell(a.help or '')} |")
    return rows + [""]


def _own_actions(group: argparse._ArgumentGroup) -> list[argparse.Action]:
    return [a for a in group._group_actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.dest != "log_level"]


def render() -> str:
    parser = build_parser()
    out = [_HEADER]
    # The engine flags are the same in every command that runs a model: one table (the serve
    # command's defaults), and each command lists only the defaults it changes.
    serve = next(p for path, p, _ in _commands(parser) if path == ("serve",))
    shared: dict[str, dict[str, argparse.Action]] = {}
    out.append("## Engine flags\n")
    out.append("Taken by `generate`, `serve`, `bench throughput`, `bench latency`, `bench interference` "
               "and `profile` (the benchmarks and `profile` change some defaults: see each command).\n")
    for group in serve._action_groups:
        if group.title in _SHARED_GROUPS:
            shared[group.title] = {a.dest: a for a in _own_actions(group)}
            out.append(f"**{group.title}**\n")
            out.extend(_table(_own_actions(group)))
    for path, parser, help_line in _commands(parser):
        if not any(not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.dest != "log_level"
                   for a in parser._actions):
            continue  # `bench`: only a group of commands
        out.append(f"## rapidserve {' '.join(path)}\n")
        if help_line:
            out.append(f"{help_line[0].upper()}{help_line[1:]}.\n")
        for group in parser._action_groups:
            actions = _own_actions(group)
            if not actions:
                continue
            if group.title in shared:
                if group.title == "engine":
                    changed = [f"`{a.option_strings[0]} {a.default}`" for a in actions
                               if a.default != shared["engine"][a.dest].default]
                    out.append("**engine**: the [engine flags](#engine-flags)"
                               + (f", with these defaults: {', '.join(changed)}.\n" if changed else ".\n"))
                continue
            title = group.title if group.title not in ("options", "optional arguments") else "options"
            out.append(f"**{title}**\n")
            out.extend(_table(actions))
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write docs/configuration.md from the CLI's parsers")
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[3] / "docs" / "configuration.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs, write nothing")
    args = p.parse_args(argv)
    text = render()
    path = Path(args.output)
    if args.check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: run python -m rapidserve.entrypoints.cli_reference", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
