"""A long-lived `dflash` command line for tests that run it hundreds of times (test_fuzz.py): a process start and
its imports cost more than a run on a tiny model.

Each line on stdin is a JSON object {"args": [...], "out": path, "err": path}: the command runs in this process with
its stdout and stderr (file descriptors 1 and 2, so llama.cpp's output too) going to those files, and the exit code
it would have had is answered as a JSON line on the original stdout; an exception escaping the command is printed
as Python would print it, exit code 1. A crash, or an exit from native code, ends the worker: the caller sees no
answer and runs that case in a process of its own (run_alone).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Result = tuple[int | str, str, str]  # exit code (negative: killed by that signal; "timeout"), stdout, stderr


def run_many(cases: list[list[str]], timeout: float, env: dict[str, str], workers: int = 2) -> list[Result]:
    """`dflash ARGS` for each case, as if each ran in a process of its own, through `workers` workers in parallel
    (each takes every workers-th case); a case exceeding timeout seconds ends as "timeout"."""
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda k: _run_some(cases[k::workers], timeout, env), range(workers)))
    results: list[Result] = [("timeout", "", "")] * len(cases)
    for k, part in enumerate(parts):
        results[k::workers] = part
    return results


def _run_some(cases: list[list[str]], timeout: float, env: dict[str, str]) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        worker = None
        for args in cases:
            if worker is None:
                worker = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=env)
            worker.stdin.write(json.dumps({"args": args, "out": str(out), "err": str(err)}) + "\n")
            worker.stdin.flush()
            # the first case of a worker also waits for its imports
            if select.select([worker.stdout], [], [], timeout + 10)[0] and (line := worker.stdout.readline()):
                results.append((json.loads(line), out.read_text(errors="replace"), err.read_text(errors="replace")))
                continue
            worker.kill()  # hung, crashed or exited from native code: that case again, alone, to see how it ends
            worker.wait()
            worker = None
            results.append(run_alone(args, timeout, env))
        if worker is not None:
            worker.stdin.close()
            worker.wait()
    return results


def run_alone(args: list[str], timeout: float, env: dict[str, str]) -> Result:
    """`dflash ARGS` in a process of its own: its exit code (negative: the signal that killed it; "timeout"), stdout
    and stderr. -P: the installed dflash_local, not a source tree in the current folder."""
    try:
        p = subprocess.run([sys.executable, "-P", "-m", "dflash_local", *args], capture_output=True, text=True,
                           timeout=timeout, env=env, errors="replace")
    except subprocess.TimeoutExpired as e:
        return "timeout", _text(e.stdout), _text(e.stderr)
    return p.returncode, p.stdout, p.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _run(app: Any, args: list[str], out: str, err: str) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as fo, open(err, "w") as fe:
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            app(args, prog_name="dflash")
            code = 0
        except SystemExit as e:  # what the interpreter would make of it
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return code


def main() -> None:
    from dflash_local.cli import app

    answers = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        case = json.loads(line)
        answers.write(json.dumps(_run(app, case["args"], case["out"], case["err"])) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
