"""Every command that README.md, BENCHMARKS.md and the modules' usage examples show (``tempme ...``,
``python -m benchmarks.X ...``, ``torchrun ... -m tempme_fast ...``) still parses: an option renamed or
removed, or a value a choice no longer takes, fails here instead of in the hands of whoever copies the line.
Only the parsing is checked; nothing runs."""
import argparse
import importlib
import os
import re
import shlex

import pytest

from kit import Parsed, stop_at_parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "BENCHMARKS.md")
# Words that stand for a value in the documents, and one such value.
PLACEHOLDERS = {"B": "2", "N": "2", "FILE": "rows.jsonl", "DIR": "out", "OUTDIR": "out", "OUT": "out",
                "VIDEO_OR_FRAMES": "clip.mp4", "ARGS": "-q", "PYTEST_ARGS": "-q", "DIR_OR_ARCHIVE...": "out"}
START = re.compile(r"(tempme [a-z]|python -m (benchmarks\.\w+|tempme_fast)\b|torchrun .*-m tempme_fast )")


def documented_commands(text: str):
    """The command lines of ``text``: lines of its shell code blocks and inline code spans (which may wrap)."""
    spans = []
    for block in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
        if block.group(1) in ("", "bash", "sh", "console"):
            spans.extend(block.group(2).splitlines())
    spans += [m.group(1).replace("\n", " ") for m in re.finditer(r"`([^`]+)`", re.sub(r"```.*?```", "", text,
                                                                                       flags=re.S))]
    for span in spans:
        for part in re.split(r"\s*(?:&&|;|\|)\s*", span.split("  #")[0].strip()):
            if START.match(part) and ": error:" not in part:
                yield part


def to_argv(command: str):
    """``(module, argv)``: the script a command runs and its arguments, with optional parts (``[--x Y]``) kept,
    those that elide (``[--models ...]``) and a trailing ``...`` dropped, and placeholders given a value."""
    command = re.sub(r"\[[^\]]*\.\.\.[^\]]*\]", "", command)
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command) if w != "..."]
    if words[0] == "tempme":
        return "tempme_fast.cli", words[1:]
    at = words.index("-m")
    module = words[at + 1]
    return ("tempme_fast.cli" if module == "tempme_fast" else module), words[at + 2:]


def usage_lines(path: str):
    """The usage examples of a module's docstring and messages: lines that start a command (continued
    with a backslash), up to a comment."""
    with open(path) as f:
        text = re.sub(r"\\{1,2}\n\s*", " ", f.read())  # join backslash-continued lines
    for line in text.splitlines():
        line = re.split(r"\s{2,}[#(]", line.strip())[0]
        if START.match(line):
            yield line


def _sources():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            yield from ((doc, command) for command in documented_commands(f.read()))
    for folder in ("benchmarks", "tempme_fast"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(base, name)
                yield from ((os.path.relpath(path, ROOT), command) for command in usage_lines(path))


COMMANDS = sorted(set(_sources()))


def test_the_documents_show_commands_of_every_kind():
    shown = {to_argv(command)[0] for _, command in COMMANDS}
    assert {"tempme_fast.cli", "benchmarks.bench_ops", "benchmarks.bench_model", "benchmarks.suite",
            "benchmarks.report", "benchmarks.codegen"} <= shown, shown
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, command, monkeypatch, capsys):
    module, argv = to_argv(command)
    parsers = stop_at_parse(monkeypatch)  # the command's first parse: stop there
    main = importlib.import_module(module).main
    try:
        main(argv)
    except Parsed:
        return
    except SystemExit as stop:
        error = capsys.readouterr().err.strip()
        # A command named in passing (`tempme eval`, `tempme eval --checkpoint`) is not a whole command line:
        # its options must exist, but its required values may be missing.
        options = argv[module == "tempme_fast.cli":]
        if all(w.startswith("-") for w in options) and re.search(r"arguments are required|expected one argument",
                                                                  error):
            parser = parsers[0]
            if module == "tempme_fast.cli" and argv:
                parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
            unknown = [w for w in options if w not in parser._option_string_actions]
            assert not unknown, f"{doc}: `{command}` names options that {parser.prog} does not have: {unknown}"
            return
        pytest.fail(f"{doc}: `{command}` does not parse (exit {stop.code}): {error}")
    pytest.fail(f"{doc}: `{command}` ran without parsing its arguments")
