"""Training prompts that need no network: the built-in set shipped with the package, Python stubs cut from
this Python's standard library or from any folder of Python code, or a file."""

from __future__ import annotations

import ast
import functools
import sysconfig
import textwrap
from pathlib import Path

from dflash_local.bench.prompts import Prompt, load_prompts
from dflash_local.errors import UserError

# coding (chat, and raw completion of Python stubs), math, explanations, chat; no topic of `dflash bench`'s chat
# set, so that benchmark stays held out
BUILTIN = Path(__file__).with_name("builtin_prompts.jsonl")
# folders of tests, demos or GUI code, or (in the stdlib) of installed packages
_SKIP = {"test", "tests", "testing", "idlelib", "turtledemo", "lib2to3", "ensurepip", "tkinter", "site-packages",
         "dist-packages", "__pycache__"}


def training_prompts(sources: list[str], n: int | None = None) -> list[Prompt]:
    """The first n distinct prompts of the sources in turn: `builtin`, `stdlib`, a folder of Python code, or a
    .jsonl/.txt file (read as `dflash bench --prompts` reads it)."""
    prompts: dict[tuple[str, bool], Prompt] = {}
    for source in sources:
        if source in ("humaneval", "chat"):
            raise UserError(f"--prompts {source} is a benchmark set, kept for evaluation: train on builtin, "
                            "stdlib, a folder of Python code or a file")
        if source == "stdlib":
            found = code_stubs(sysconfig.get_paths()["stdlib"], "stdlib")
        elif Path(source).is_dir():
            found = code_stubs(source, Path(source).name)
            if not found:
                raise UserError(f"--prompts {source}: no .py file under it has a documented public function")
        else:
            found = load_prompts(str(BUILTIN if source == "builtin" else source), 1 << 30)
        for p in found:
            prompts.setdefault((p.text, p.chat), p)
    return list(prompts.values())[:n]


# the chat form of a stub: an instruct model answers it with code and prose about the code, as it continues a
# HumanEval prompt in raw completion, where library code alone mostly gets the library's code back
CHAT_REQUEST = "Write the body of this Python function:\n\n```python\n{stub}```"


def prompt_group(prompt: Prompt) -> str:
    """What a prompt came from: a code stub's file (its raw and chat forms and the file's other stubs share much
    text), else the prompt itself. The trainer holds out whole groups."""
    return prompt.id.split(".py:", 1)[0]


@functools.cache  # parsing the whole stdlib takes seconds
def code_stubs(folder: str, name: str) -> tuple[Prompt, ...]:
    """Prompts from the Python files under folder (tests left out), three per documented public function (or
    method, under its class line): the module's imports then the function up to the end of its docstring, in
    HumanEval's shape, as raw completion; the function alone (dedented, no imports or class) after a blank line,
    as 97 of HumanEval's 164 prompts start, also raw, where that differs; and the first in a chat request
    (CHAT_REQUEST). Prompt ids are name/path.py:function (or :Class.method), with /bare and /chat for the others.

    The raw forms are continued differently: after the module's imports SmolLM2 mostly writes more of the library
    (49 of 60 stdlib stubs); after a plain function alone, prose about it 30 times of 60, tests 9 and code 21;
    after the blank line first, prose 17, tests 13 and code 27, nearer HumanEval's 59, 61 and 37 of 164
    (bench/train/continuations.py)."""
    root = Path(folder)
    stubs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP & set(rel.parts[:-1]) or rel.name.startswith("test"):
            continue
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        # whole lines: ast.get_source_segment splits the whole file again for every call
        imports = ["".join(lines[s.lineno - 1:s.end_lineno]).rstrip()
                   for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))][:8]
        head = "\n".join(imports) + "\n\n\n" if imports else ""
        module = f"{name}/{rel.as_posix()}:"
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                cls = "".join(lines[node.lineno - 1:node.body[0].lineno - 1])
                stubs += [(f"{module}{node.name}.{fn.name}", head + cls, _stub(fn, lines))
                          for fn in node.body if _documented(fn)]
            elif _documented(node):
                stubs.append((f"{module}{node.name}", head, _stub(node, lines)))
    prompts = []
    for id_, context, fn in stubs:
        prompts.append(Prompt(id_, context + fn, False))
        bare = textwrap.dedent(fn)
        if context and not bare[0].isspace():  # else the same text as the first, or a docstring left of its def
            prompts.append(Prompt(f"{id_}/bare", "\n" + bare, False))
        prompts.append(Prompt(f"{id_}/chat", CHAT_REQUEST.format(stub=context + fn), True))
    return tuple(prompts)


def _documented(node: ast.stmt) -> bool:
    """A public function whose docstring says enough to write it from."""
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or len(node.body) < 2:
        return False
    doc = ast.get_docstring(node)
    return doc is not None and 20 <= len(doc) <= 800


def _stub(fn: ast.FunctionDef, lines: list[str]) -> str:
    """Decorators, signature and docstring of fn, as written."""
    start = min([d.lineno for d in fn.decorator_list] + [fn.lineno]) - 1
    return "".join(lines[start:fn.body[0].end_lineno])
