"""`dflash run` end to end through the Typer runner, on SmolLM2, and its errors on bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from synthetic_drafters import random_drafter_gguf
from typer.testing import CliRunner

from dflash_local.cli import app
from dflash_local.model_registry import DEFAULT_MODEL

PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def smol_drafter(smollm2_path, tmp_path_factory):
    return random_drafter_gguf(smollm2_path, tmp_path_factory.mktemp("d") / "smol-dflash.gguf", n_layer=1)


def _run(*args: str):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def test_run_same_text_as_target_alone(smollm2_path, smol_drafter):
    alone = _run(smollm2_path, "--no-draft", "-p", PROMPT, "--temp", "0", "-n", "24", "-t", "1")
    drafted = _run(smollm2_path, "--drafter", smol_drafter, "-p", PROMPT, "--temp", "0", "-n", "24", "-t", "1")
    assert alone.exit_code == 0, alone.output
    assert drafted.exit_code == 0, drafted.output
    assert alone.stdout.strip() and alone.stdout == drafted.stdout
    assert "tau" in drafted.stderr and "tok/s" in drafted.stderr


def test_run_default_model_with_the_shipped_drafter():
    alone = _run("--no-draft", "-p", PROMPT, "--temp", "0", "-n", "24", "-t", "1")
    drafted = _run("-p", PROMPT, "--temp", "0", "-n", "24", "-t", "1")
    by_name = _run(DEFAULT_MODEL, "-p", PROMPT, "--temp", "0", "-n", "24", "-t", "1")
    assert drafted.exit_code == 0, drafted.output
    assert alone.stdout.strip() and alone.stdout == drafted.stdout == by_name.stdout
    assert "tau" in drafted.stderr and "no drafter found" not in drafted.stderr


def test_run_finds_no_drafter_and_says_so(tiny_target):
    result = _run(tiny_target("llama"), "-p", PROMPT, "-n", "4", "-t", "1")
    assert result.exit_code == 0
    assert "no drafter found" in result.stderr


def test_run_bad_inputs(smollm2_path, smol_drafter, tiny_target, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [  # exit code 1: bad input; 2: usage
        ((tmp_path / "missing.gguf", "-p", "hi"), 1, "target model not found"),
        (("nope", "-p", "hi"), 1, "neither a file nor a built-in model (smollm2, coder"),
        ((corrupt, "-p", "hi"), 1, "not a valid GGUF"),
        ((smollm2_path, "--drafter", tmp_path / "missing.gguf", "-p", "hi"), 1, "drafter not found"),
        ((smollm2_path, "--drafter", smollm2_path, "-p", "hi"), 1, "not a DFlash drafter"),
        ((tiny_target("llama"), "--drafter", smol_drafter, "-p", "hi"), 1, "hidden size"),
        ((smollm2_path, "--no-draft", "-p", "word " * 400, "--ctx-size", "64"), 1, "but the context holds"),
        ((smollm2_path, "-f", empty), 1, "is empty"),
        ((smollm2_path, "--drafter", smol_drafter, "--block-size", "32", "-p", "hi"), 2, "--block-size"),
        ((smollm2_path, "-p", "hi", "-f", tmp_path / "p.txt"), 2, "either --prompt or --file"),
        ((smollm2_path, "-p", "hi", "--tensor-split", "a,b"), 2, "--tensor-split"),
        ((smollm2_path, "-p", "hi", "--max-tokens", "0"), 2, "--max-tokens"),
        ((smollm2_path, "-p", "hi", "--max-tokens", "-3"), 2, "--max-tokens"),
        ((smollm2_path, "-p", "hi", "--ctx-size", "100000000"), 1, "cannot"),
        ((smollm2_path, "-p", "hi", "--device", "NOPE0"), 1, "no ggml device named 'NOPE0'"),
    ]
    for args, code, message in cases:
        result = _run(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


def test_the_command_line_loads_llama_cpp_before_numpy(smollm2_path):
    """numpy loaded before llama_cpp crashed llama.cpp's CUDA model load (an H200 machine): the command line's own
    modules import neither, and a command loads llama_cpp first."""
    code = ("import sys, dflash_local.cli; assert 'numpy' not in sys.modules, 'numpy'\n"
            "try:\n    dflash_local.cli.app(['run', sys.argv[1], '-p', 'hi', '-n', '2', '-t', '1'])\n"
            "except SystemExit:\n    pass\n"
            "m = list(sys.modules); print(m.index('llama_cpp.llama_cpp') < m.index('numpy'))")  # it loads libllama
    # -P: the installed dflash_local, not the source tree of the current folder
    out = subprocess.run([sys.executable, "-P", "-c", code, str(smollm2_path)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_tiny_context_ends_cleanly(smollm2_path):
    """A context too small for a block: the target goes on alone and says the context filled up."""
    result = _run(smollm2_path, "-p", "hi", "--ctx-size", "16", "-n", "400", "-t", "1")
    assert result.exit_code == 0, result.output
    assert "context is full" in result.stderr


def _ctrl_c_as_in_a_terminal() -> None:
    """In a child that is sent SIGINT: the default handling, which Python turns into KeyboardInterrupt. A shell's
    background job (a CI run started with `&`) ignores SIGINT, and a Python started from it keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("wait", [2.0, 8.0])  # in the load, calibration or prefill; while generating
def test_ctrl_c_ends_cleanly(smollm2_path, wait):
    """Ctrl-C keeps what was generated: no traceback, exit 0 while generating (the answer so far printed), 130 before."""
    import time

    proc = subprocess.Popen([sys.executable, "-P", "-m", "dflash_local", "run", str(smollm2_path), "-p", PROMPT, "-n",
                             "100000", "--ctx-size", "8192", "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    time.sleep(wait)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and proc.returncode in (0, 130), (proc.returncode, err)
    if proc.returncode == 0:  # interrupted while generating (or the answer had ended): what came is printed
        assert out.strip() and "tok/s" in err, err


class _Chat:
    """`dflash run` with no prompt in a subprocess, its stdout and stderr gathered by threads as they come: a test acts
    on what it has printed, not after fixed sleeps, which a slow or loaded machine outlasts."""

    def __init__(self, *args: str):
        # -P: the installed dflash_local, not the source tree of the current folder
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "dflash_local", "run", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_ctrl_c_as_in_a_terminal)
        self.out = self.err = b""
        self._changed = threading.Condition()
        self._open = 2
        for name in ("out", "err"):
            threading.Thread(target=self._gather, args=(name,), daemon=True).start()

    def _gather(self, name: str) -> None:
        pipe = getattr(self.proc, f"std{name}")
        while chunk := pipe.read1():
            with self._changed:
                setattr(self, name, getattr(self, name) + chunk)
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, done: Callable[[], bool], timeout: float = 300.0) -> None:
        with self._changed:
            self._changed.wait_for(lambda: done() or not self._open, timeout)
            assert done(), (self.out.decode(errors="replace"), self.err.decode(errors="replace"))

    def exit_code(self, timeout: float = 120.0) -> int:
        """Once the process has ended and all it printed is gathered."""
        code = self.proc.wait(timeout)
        self.wait_for(lambda: not self._open, timeout)
        return code


@pytest.mark.parametrize("end", ["ctrl-c", "eof"])
def test_ctrl_c_in_a_chat_ends_the_answer(smollm2_path, end):
    """In a chat, Ctrl-C while an answer is generated ends that answer, which stays printed, and the chat goes on to
    the next prompt; Ctrl-C or Ctrl-D (EOF) at the prompt ends the chat: exit 0, no traceback."""
    # greedy, the answer runs to -n: Ctrl-C comes before its end however slow the machine; the shipped drafter
    chat = _Chat(str(smollm2_path), "-n", "400", "--ctx-size", "512", "-t", "1")
    try:
        chat.wait_for(lambda: chat.out == b"> ")  # loaded and calibrated: the first prompt
        for turn in (1, 2):  # the second: the chat generates again after an answer was cut
            start = len(chat.out)
            chat.send("Write the numbers from 1 to 1000.")
            chat.wait_for(lambda: len(chat.out) > start)  # the answer is coming
            chat.proc.send_signal(signal.SIGINT)
            # the answer's stats line on stderr, then the next prompt on stdout
            chat.wait_for(lambda: chat.err.count(b"tok/s") == turn and chat.out.endswith(b"\n> "))
            answer, stats = chat.out[start:-3].decode(), chat.err.decode().splitlines()[-1]
            assert answer.strip() and stats.endswith(", interrupted"), (answer, stats)
        if end == "ctrl-c":
            # again while it runs, as a person presses Ctrl-C again: a signal that comes between input()'s prompt and
            # its read is handled, but the read that begins after it waits (seen once on a loaded machine)
            for _ in range(5):
                chat.proc.send_signal(signal.SIGINT)
                try:
                    chat.proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    pass
        else:
            chat.proc.stdin.close()
        assert chat.exit_code() == 0, chat.err
    finally:
        chat.proc.kill()
    assert chat.out.endswith(b"\n> \n") and b"Traceback" not in chat.err, chat.err
