"""A prompt file of the stubs alone (the `/bare` prompts of `code_stubs`: a blank line, then a function's signature and
docstring, dedented) of installed packages: the kind of training data that moved HumanEval tau most
(bench/HISTORY.md). Plain functions come first, since HumanEval's prompts are plain functions, then methods;
each part shuffled, so that a data phase cut short by a time limit still spans all the packages.

    python bench/train/bare_stubs.py OUT.jsonl PACKAGE [PACKAGE ...]   # e.g. sympy networkx scipy
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys

from dflash_local.train.prompts import code_stubs


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    stubs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"{name}: not an installed package, left out", file=sys.stderr)
            continue
        found = [p for p in code_stubs(spec.submodule_search_locations[0], name) if p.id.endswith("/bare")]
        print(f"{name}: {len(found)} stubs alone", file=sys.stderr)
        stubs += found
    random.Random(0).shuffle(stubs)
    # a method's id names its class (path.py:Class.method); a decorated function starts with its decorator
    stubs.sort(key=lambda p: "." in p.id.split(".py:", 1)[1] or p.text.lstrip().startswith("@"))
    with open(out, "w") as f:
        for p in stubs:
            f.write(json.dumps({"id": p.id, "prompt": p.text, "chat": p.chat}) + "\n")
    print(f"{len(stubs)} prompts in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
