"""What the target writes after a function stub: its greedy continuation (raw completion), classified by the first
line that leaves the function's body. Shows which training prompts are continued as HumanEval's are.

    python bench/train/continuations.py TARGET.gguf SET:N [...] [--tokens 48] [--threads N] [--json F]

SET is humaneval, stdlib:raw / stdlib:bare (the module's imports then the stub, or the stub alone after a blank
line, as `dflash train --prompts stdlib` cuts them) or a prompt file; N the number of prompts, spread over the set.
Every prompt is continued as raw text.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from dflash_local.bench.machine import git_commit, machine_info
from dflash_local.bench.prompts import load_prompts
from dflash_local.engine import Engine
from dflash_local.target import Target, TargetParams
from dflash_local.train.prompts import training_prompts

MODES = ("prose", "tests or examples", "more code", "body only")
_CODE = ("def ", "class ", "@", "import ", "from ")
_TESTS = ("#", "print(", "assert ", "if __name__", ">>>")


def mode(continuation: str) -> str:
    """The kind of the first non-empty line at column 0 after the continuation's first line (which may still
    belong to the body): a code fence or text, test code, or another definition."""
    for line in continuation.splitlines()[1:]:
        if not line.strip() or line[0].isspace():
            continue
        if line.startswith(_CODE):
            return "more code"
        if line.startswith(_TESTS):
            return "tests or examples"
        return "prose"  # a closing ``` and what follows it, or text right away
    return "body only"


def stubs(spec: str, n: int) -> list[str]:
    if spec in ("stdlib:raw", "stdlib:bare"):
        bare = spec == "stdlib:bare"
        texts = [p.text for p in training_prompts(["stdlib"]) if not p.chat and p.id.endswith("/bare") == bare]
    else:  # raw completion, whatever the file's lines say
        texts = [p.text for p in load_prompts(spec, 1 << 30)]
    return texts[::max(1, len(texts) // n)][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", type=Path)
    ap.add_argument("sets", nargs="+", help="SET:N")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: its default)")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    a = ap.parse_args()
    engine = Engine(Target(a.target, TargetParams(n_ctx=4096, n_threads=a.threads)))
    rows = {}
    for s in a.sets:
        spec, n = s.rsplit(":", 1)
        counts = collections.Counter()
        for text in track(stubs(spec, int(n)), description=spec):
            gen = engine.generate(engine.target.tokenize(text), a.tokens)
            counts[mode(engine.target.text(gen.tokens))] += 1
        rows[s] = {m: counts[m] for m in MODES}
    table = Table(title=f"what the target writes after a stub (greedy, {a.tokens} tokens)")
    for col in ("prompts", *MODES):
        table.add_column(col)
    for s, counts in rows.items():
        table.add_row(s, *(str(counts[m]) for m in MODES))
    Console().print(table)
    if a.json:
        a.json.write_text(json.dumps({"target": str(a.target), "tokens": a.tokens, "machine": machine_info(),
                                      "commit": git_commit(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
