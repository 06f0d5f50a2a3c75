"""The Python examples of README.md (its code blocks and the calls its text shows in passing) and of the
package's docstrings call what exists, as it is called: every name they import, every attribute they reach
from a module or class, and the arguments of every call that reaches a function of this library bind to its
signature. Nothing runs; the examples are read, as the documented commands are (test_docs_commands.py)."""
import ast
import importlib
import inspect
import os
import re
import textwrap

import open_clip
import pytest

import tempme_fast
from tempme_fast.index import VideoIndex
from tempme_fast.model import _tempme_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the examples' variables hold, where an example does not make them itself.
VARIABLES = {"model": _tempme_class(open_clip.CLIP), "index": VideoIndex, "encoder": tempme_fast.GraphedVideoEncoder,
             "trainer": tempme_fast.Trainer}


def readme_examples():
    with open(os.path.join(ROOT, "README.md")) as f:
        return [("README.md", block) for block in re.findall(r"```python\n(.*?)```", f.read(), re.S)]


def inline_calls():
    """The calls shown in passing in README.md's text (`` `encode_video(check_finite=...)` ``): inline code
    spans that parse as a Python call."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    found = []
    for span in re.findall(r"`([^`]+)`", text):
        span = span.replace("\n", " ")
        try:
            tree = ast.parse(span, mode="eval")
        except SyntaxError:
            continue
        if any(isinstance(node, ast.Call) for node in ast.walk(tree)):
            found.append(("README.md (inline)", span))
    return found


def docstring_examples():
    """The example blocks (indented runs of lines that parse as Python and use this library) of the package's
    module docstrings; shell commands among them are test_docs_commands.py's."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tempme_fast")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
            for block in re.findall(r"(?:^    .*\n?)+", doc, re.M):
                code = textwrap.dedent(block)
                try:
                    ast.parse(code)
                except SyntaxError:
                    continue
                if re.search(r"\btempme_fast\.|\bTrainer\(|\bTrainConfig\(", code):
                    found.append((os.path.relpath(path, ROOT), code))
    return found


def _resolve(node, names):
    """What ``node`` (a name or a chain of attributes) is, or None where the example's own values are met."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None:
            return None
        if not hasattr(base, node.attr):
            raise AssertionError(f"{ast.unparse(node)}: {getattr(base, '__name__', base)!r} has no {node.attr!r}")
        return getattr(base, node.attr)
    return None


def check_example(where, code):
    """Raise AssertionError naming the line of ``code`` that imports, reaches or calls what does not exist."""
    tree = ast.parse(code)
    # Names an example uses without importing them: the package's own, and the documented module's.
    names = {name: getattr(tempme_fast, name) for name in tempme_fast.__all__}
    if where.endswith(".py"):
        module = importlib.import_module(where[:-len(".py")].replace("/", ".").replace(".__init__", ""))
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    names.update(VARIABLES)
    checked = 0
    for node in ast.walk(tree):  # imports first: an example may use a name before its import is walked
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("tempme_fast", "open_clip"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: `from {node.module} import {alias.name}`: no such name"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for target in node.targets:  # a name an example rebinds is its own value from then on
                if isinstance(target, ast.Name) and target.id not in VARIABLES:
                    names.pop(target.id, None)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Call, ast.Attribute)):
            continue
        try:
            target = _resolve(node.func if isinstance(node, ast.Call) else node, names)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None
        if not isinstance(node, ast.Call) or target is None or not callable(target):
            continue
        if not (getattr(target, "__module__", "") or "").startswith("tempme_fast"):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        args = [None] * len(node.args)
        if inspect.isfunction(target) and target.__qualname__ != target.__name__ and \
                isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) and \
                node.func.value.id in VARIABLES:
            args = [None] + args  # a method reached through an instance: self
        # Text in passing (`Trainer(output_dir=...)`) and elided arguments (`f(..., x=1)`) show a part of a call.
        elided = where.endswith("(inline)") or any(isinstance(a, ast.Constant) and a.value is Ellipsis
                                                   for a in node.args)
        args = [a for a, given in zip(args, [None] * (len(args) - len(node.args)) + node.args)
                if not (isinstance(given, ast.Constant) and given.value is Ellipsis)]
        try:
            (signature.bind_partial if elided else signature.bind)(*args, **{k.arg: None for k in node.keywords})
        except TypeError as err:
            raise AssertionError(f"{where}: {ast.unparse(node)}: {err} (signature {signature})") from None
        checked += 1
    return checked


EXAMPLES = readme_examples() + docstring_examples() + inline_calls()


@pytest.mark.parametrize("where, code", EXAMPLES, ids=[f"{w}-{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_examples_call_what_exists(where, code):
    check_example(where, code)


def test_the_examples_are_found_and_checked():
    assert len(readme_examples()) >= 6
    assert sum(check_example(w, c) for w, c in readme_examples()) >= 15
    assert sum(check_example(w, c) for w, c in inline_calls()) >= 15
    assert sum(check_example(w, c) for w, c in docstring_examples()) >= 10


@pytest.mark.parametrize("code, says", [
    ("from tempme_fast import apply_tempmee", "no such name"),
    ("import tempme_fast\ntempme_fast.apply_tempme(model, backend='triton', atention='sdpa')", "atention"),
    ("import tempme_fast\ntempme_fast.TempMeConfig.for_model(model, frames=8, budget=0.5)", "budget"),
    ("model.encode_video(video, mask, normalise=True)", "normalise"),
    ("import tempme_fast\ntempme_fast.ops.no_such_op(x)", "no 'no_such_op'"),
])
def test_a_drifted_example_fails(code, says):
    with pytest.raises(AssertionError, match=says):
        check_example("example", code)
