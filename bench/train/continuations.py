"""What the target writes after a function stub: its greedy continuation (raw completion), classified by the first
line that leaves the function's body. Shows which training prompts are continued as HumanEval's are.

    python bench/train/continuations.py TARGET.gguf SET:N [...] [--tokens 48] [--threads N] [--json F]

SET is humaneval, stdlib:raw / stdlib:bare (the module's imports then the stub, or the stub alone after a blank
line, as `dflash train --prompts stdlib` cuts them) or a prompt file; N the number of prompts, spread over the set.
Every prompt is continued as raw text. With `--drafter D.gguf` the continuations are DFlash's (greedy, every pass
drafting the whole block, as `tau.py`: the same text) and each kind also gets its mean tau: where the drafter loses.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from dflash_local.bench.machine import git_commit, machine_info
from dflash_local.bench.prompts import load_prompts
from dflash_local.engine import Engine
from dflash_local.loader import open_models
from dflash_local.target import TargetParams
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
    ap.add_argument("--drafter", type=Path, help="also the tau of this drafter by kind of continuation")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    a = ap.parse_args()
    target, drafter = open_models(a.target, a.drafter, TargetParams(n_ctx=4096, n_threads=a.threads))
    engine = Engine(target, drafter, adaptive=False)
    rows, taus = {}, {}
    for s in a.sets:
        spec, n = s.rsplit(":", 1)
        by_mode = collections.defaultdict(list)  # the tau of each continuation (nan without a drafter)
        for text in track(stubs(spec, int(n)), description=spec):
            gen = engine.generate(target.tokenize(text), a.tokens)
            by_mode[mode(target.text(gen.tokens))].append(gen.stats.tau if gen.stats.passes else float("nan"))
        rows[s] = {m: len(by_mode[m]) for m in MODES}
        taus[s] = {m: float(np.nanmean(by_mode[m])) if drafter and by_mode[m] else None for m in MODES}
    engine_name = f"DFlash with {a.drafter.name}: count (tau)" if drafter else "greedy"
    table = Table(title=f"what the target writes after a stub ({engine_name}, {a.tokens} tokens)")
    for col in ("prompts", *MODES):
        table.add_column(col)
    for s, counts in rows.items():
        table.add_row(s, *(f"{counts[m]}" + ("" if taus[s][m] is None else f" ({taus[s][m]:.2f})") for m in MODES))
    Console().print(table)
    if a.json:
        a.json.write_text(json.dumps({"target": str(a.target), "drafter": a.drafter and str(a.drafter),
                                      "tokens": a.tokens, "machine": machine_info(), "commit": git_commit(),
                                      "rows": rows, "tau": taus if drafter else None}, indent=1))


if __name__ == "__main__":
    main()
