"""Training prompts in HumanEval's shape that the target writes itself (for the coder's drafter, issue 25): asked in a
chat request for a new exercise on a topic (a function's signature and a docstring with examples, no solution), it
writes one, sampled at min-p 0.1 as `dflash train --self-prompts` samples requests. A reply whose code parses is cut
after the docstring of its last function, as HumanEval's prompts end, and kept as two prompts of one group: that code
as raw completion, and the chat request `dflash train` makes of a code stub. Exercises that HumanEval names a function
of, that repeat one written before, or whose function name three kept ones have, are dropped, so that HumanEval
stays a held-out set and the names vary.

Each kept exercise is appended to OUT at once (a run cut short keeps them; a run on the same OUT goes on with other
random draws and skips what it holds).

    python bench/train/write_problems.py TARGET.gguf -n 2000 -o problems.jsonl [--parallel 16] [--threads N]
        [--n-gpu-layers N] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from collections import Counter
from pathlib import Path

from rich.progress import Progress

from dflash_local.bench.prompts import load_prompts
from dflash_local.target import Target, TargetParams
from dflash_local.train.answers import REQUEST_MIN_P, Todo, continue_prompts
from dflash_local.train.prompts import CHAT_REQUEST

REQUEST = ("Write a new short Python programming exercise about {topic}, in the style of HumanEval: the imports it "
           "needs, then one function with a docstring that states the task and shows two or three examples. Do not "
           "solve it: the function's body is only its docstring.")
CODE = "```python\n"  # the reply starts as a code block, so that it is code from its first token
MAX_TOKENS = 320
NAME_REPEATS = 3  # exercises kept of one function name
TOPICS = (
    "strings", "lists of integers", "prime numbers", "dictionaries", "dates and times", "matrices", "sorting",
    "parsing text", "binary numbers", "geometry", "counting characters", "palindromes", "number sequences",
    "intervals", "bank account balances", "student grades", "vowels and consonants", "brackets", "digits of a number",
    "sets", "running totals", "words in a sentence", "simple ciphers", "unit conversion", "roman numerals",
    "anagrams", "temperatures", "coins and change", "stock prices", "string compression", "nested lists", "tuples",
    "filtering lists", "closest pairs of numbers", "largest and smallest elements", "rounding numbers",
    "averages and medians", "modular arithmetic", "greatest common divisors", "triangles", "file names",
    "email addresses", "searching a sorted list", "even and odd numbers", "sums of squares", "factorials",
    "case conversion", "substrings", "prefixes and suffixes", "unique elements", "frequencies", "rotating lists",
    "bitwise operations", "grids", "paths in a grid", "fractions", "polynomials", "time durations", "shopping carts",
    "inventory counts", "scores of a game", "cards and dice", "calendar weeks", "vectors", "histograms",
    "run-length encoding", "balanced parentheses", "whitespace in text", "numbers as words", "hexadecimal",
    "pairs that sum to a target", "subsequences", "the nth element of a sequence", "list of strings by length",
    "overlapping ranges", "distances between points", "clock times", "passwords", "queues and stacks",
    "counting words", "maximum subarrays", "missing numbers", "duplicate values", "powers of two", "percentages",
)


def last_function(code: str) -> ast.FunctionDef | None:
    """code's last top-level function, if code parses and has one."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    return next((n for n in reversed(tree.body) if isinstance(n, ast.FunctionDef)), None)


def exercise(code: str) -> tuple[str, str] | None:
    """code up to the end of its last function's docstring, and that function's name; None unless that docstring
    gives an example."""
    fn = last_function(code)
    doc = ast.get_docstring(fn) if fn else None
    if fn is None or doc is None or (">>>" not in doc and "example" not in doc.lower()):
        return None
    return "".join(code.splitlines(keepends=True)[:fn.body[0].end_lineno]).rstrip() + "\n", fn.name


def read_kept(out: Path) -> tuple[set[str], Counter[str]]:
    """The raw prompts OUT holds already, and how many of them each function name has."""
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    raw = [r for r in rows if not r["chat"]]
    return {r["prompt"] for r in raw}, Counter(r["id"].rsplit(":", 1)[1] for r in raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("-n", type=int, required=True, help="exercises to have in OUT")
    ap.add_argument("-o", "--out", type=Path, required=True)
    for flag, default in (("--parallel", 16), ("--threads", 0), ("--n-gpu-layers", 0), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default)
    a = ap.parse_args()

    humaneval = {fn.name for p in load_prompts("humaneval", 164) if (fn := last_function(p.text))}
    kept, names = read_kept(a.out)
    n_kept = len(kept)
    seed = a.seed * 1_000_003 + n_kept  # a run that goes on draws other topics and samples
    rng = random.Random(seed)
    tg = Target(a.target, TargetParams(n_ctx=512, n_seq=a.parallel, n_threads=a.threads,
                                       n_gpu_layers=a.n_gpu_layers))
    if tg.chat_prompt([("user", "")]) is None:
        raise SystemExit(f"{a.target} has no chat template to ask for exercises under")
    tries = 0

    def next_request() -> Todo | None:
        nonlocal tries
        if n_kept >= a.n or tries >= 4 * a.n + 64:
            return None
        tries += 1
        topic = rng.choice(TOPICS)
        text = str(tg.chat_prompt([("user", REQUEST.format(topic=topic))])) + CODE
        return Todo(topic, topic, tg.tokenize(text))

    with a.out.open("a") as f, Progress() as progress:
        task = progress.add_task("target writes exercises", total=a.n, completed=n_kept)

        def done(request: Todo, reply: list[int]) -> None:
            nonlocal n_kept
            found = exercise(tg.text(reply).split("```")[0])
            if (found is None or found[1] in humaneval or names[found[1]] >= NAME_REPEATS or found[0] in kept
                    or n_kept >= a.n):
                return
            stub, name = found
            kept.add(stub)
            names[name] += 1
            n_kept += 1
            # both forms one group (prompt_group), outside answers.SELF_GROUP: `dflash train --self-prompts` counts
            # the requests it wrote by that prefix
            pid = f"exercise/{n_kept:05d}.py:{name}"
            f.write(json.dumps({"id": pid, "prompt": stub, "chat": False, "topic": request.key}) + "\n")
            f.write(json.dumps({"id": f"{pid}/chat", "prompt": CHAT_REQUEST.format(stub=stub), "chat": True}) + "\n")
            f.flush()
            progress.update(task, completed=n_kept)

        def closed(out: list[int]) -> bool:  # the code block has ended
            return "```" in tg.text(out[-3:])

        try:
            if not tg.sample_on_device(REQUEST_MIN_P, seed):
                raise SystemExit("llama.cpp cannot sample on this backend")
            continue_prompts(tg, next_request, tg.sampled, MAX_TOKENS, done, closed)
        finally:
            tg.close()
    print(f"{n_kept} exercises in {a.out} ({tries} requests this run)")


if __name__ == "__main__":
    main()
