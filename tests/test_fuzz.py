"""Damaged model files end cleanly: hundreds of truncated and bit-flipped copies of a small drafter and of tiny
targets, each run through `dflash run`; none may die by a signal, hang, or print a traceback, and a failure must say
so in one `error:` line (exit code 1 or 2).

DFLASH_FUZZ_CASES (copies of each file, default 150) and DFLASH_FUZZ_SEED (default 0) explore further.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from cli_worker import Result, run_many
from synthetic_drafters import edit_gguf, random_drafter_gguf

from dflash_local.errors import UserError
from dflash_local.gguf_file import read_layout
from dflash_local.target_check import check_target_file

N_CASES = int(os.environ.get("DFLASH_FUZZ_CASES", 150))
SEED = int(os.environ.get("DFLASH_FUZZ_SEED", 0))
TIMEOUT = 30  # seconds; a tiny model's run takes well under one
Span = tuple[int, int]


def regions(path: Path) -> dict[str, list[Span]]:
    """The parts of a GGUF file, each as the byte ranges it covers: the header, the model's keys (each key and its
    value), the tokenizer's keys, the tensor infos and the tensor data."""
    layout = read_layout(path)
    keys: dict[str, list[Span]] = {"model keys": [], "tokenizer keys": []}
    for name, f in gguf.GGUFReader(path).fields.items():
        if not name.startswith("GGUF."):  # the header's fields
            part = "tokenizer keys" if name.startswith("tokenizer.") else "model keys"
            keys[part].append((f.offset, f.offset + sum(p.nbytes for p in f.parts)))
    return {"header": [(0, 24)], **keys, "tensor infos": [(layout.tensor_info_offset, layout.data_offset)],
            "tensor data": [(layout.data_offset, layout.size)]}


def damaged_copies(path: Path, out: Path, n: int, rng: random.Random) -> list[tuple[Path, str]]:
    """n copies of path, each truncated or with 1 to 3 bits flipped in one region (a random key of the key regions,
    so that short values are hit as often as the vocabulary), and what was done to it."""
    data, parts = path.read_bytes(), regions(path)
    copies = []
    for i in range(n):
        region = rng.choice(list(parts))
        start, end = rng.choice(parts[region])
        damaged = bytearray(data)
        if rng.random() < 0.3:
            cut = rng.randrange(start, end)
            damaged, what = damaged[:cut], f"truncated in the {region} at byte {cut}"
        else:
            flips = sorted((rng.randrange(start, end), rng.randrange(8)) for _ in range(rng.randint(1, 3)))
            for offset, bit in flips:
                damaged[offset] ^= 1 << bit
            what = f"bits flipped in the {region} (byte, bit): {flips}"
        copy = out / f"{path.stem}-{i}.gguf"
        copy.write_bytes(damaged)
        copies.append((copy, what))
    return copies


ABORTED = "llama.cpp stopped on a failed check"  # the abort handler's line: exit 1 too, as any bad input


def problem(result: Result) -> str | None:
    """What is wrong with how a run ended, if anything."""
    rc, out, err = result
    if rc == "timeout":
        return "hung"
    if rc not in (0, 1, 2):
        return f"exit code {rc}" + (" (killed by a signal)" if isinstance(rc, int) and rc < 0 else "")
    if "Traceback" in out + err:
        return "a Python traceback"
    if rc and sum(line.startswith("error:") for line in err.splitlines()) != 1:
        return "no single error: line"
    return None


def test_damaged_files_end_cleanly(tiny_target, tmp_path, capsys):
    rng = random.Random(SEED)
    llama, qwen35 = tiny_target("llama"), tiny_target("qwen35")
    drafters = {t: random_drafter_gguf(t, tmp_path / f"{t.stem}-dflash.gguf", n_layer=1, outtype="f16")
                for t in (llama, qwen35)}
    # the drafter's copies with its target, each target's copies with its drafter; half as many of qwen35, whose
    # hybrid layers go through other parts of llama.cpp
    cases = [(copy, what, llama, copy) for copy, what in damaged_copies(drafters[llama], tmp_path, N_CASES, rng)]
    cases += [(copy, what, copy, drafters[t]) for t, n in ((llama, N_CASES), (qwen35, N_CASES // 2))
              for copy, what in damaged_copies(t, tmp_path, n, rng)]
    env = os.environ | {"DFLASH_CACHE": str(tmp_path / "cache"), "GGML_NO_BACKTRACE": "1"}
    args = [["run", str(target), "--drafter", str(drafter), "-p", "hi", "--max-tokens", "4", "--threads", "1"]
            for _, _, target, drafter in cases]
    results = run_many(args, TIMEOUT, env)

    codes: dict[str, int] = {}
    for rc, _, _ in results:
        codes[str(rc)] = codes.get(str(rc), 0) + 1
    with capsys.disabled():
        print(f"\nfuzz (seed {SEED}): {len(cases)} damaged files ({N_CASES} of a drafter, {len(cases) - N_CASES} of "
              f"targets); exit codes: {', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))}")
        for (copy, what, _, _), (rc, _, err) in zip(cases, results):
            if rc == 1 and ABORTED in err:  # what no check caught before llama.cpp or ggml asserted on it
                print(f"  llama.cpp asserted: {copy.name} ({what}): {err.strip().splitlines()[-1][:300]}")
    failures = []
    for (copy, what, _, _), result in zip(cases, results):
        if why := problem(result):
            failures.append(f"{copy.name} ({what}): {why}\n{result[2][-600:]}")
    assert not failures, f"{len(failures)} of {len(cases)} runs did not end cleanly:\n" + "\n".join(failures[:10])
    assert codes.get("0", 0) and codes.get("1", 0)  # both kinds of damage: harmless ones and refused ones (bad input)


def test_an_assertion_in_llama_cpp_ends_in_one_error_line(tiny_target, tmp_path):
    """The last line of defence: what the checks before llama.cpp miss and it asserts on (here a duplicate token, with
    the check for it switched off) ends as one error line and exit code 1, not as SIGABRT and a backtrace."""
    target = tmp_path / "duplicate-token.gguf"
    target.write_bytes(tiny_target("llama").read_bytes().replace(b"<0x25>", b"<0x24>", 1))
    code = ("import sys, dflash_local.target_check as c; c._check_vocab = lambda layout: None; "
            "from dflash_local.cli import app; app(sys.argv[1:], prog_name='dflash')")
    args = ["run", str(target), "--no-draft", "-p", "hi", "-n", "4", "-t", "1"]
    p = subprocess.run([sys.executable, "-P", "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and problem((p.returncode, p.stdout, p.stderr)) is None, p.stderr
    assert "GGML_ASSERT(id_to_token.size() == token_to_id.size())" in p.stderr


U32 = gguf.GGUFValueType.UINT32


@pytest.mark.parametrize("keys, words", [
    ({"llama.block_count": (513, U32)}, "llama.block_count is 513, not 1..512"),
    ({"llama.attention.head_count_kv": (2**28 + 2, U32)}, "not a multiple of head_count_kv 268435458"),
    ({"llama.attention.key_length": (2**29, U32)}, "overflows"),
    ({"llama.rope.dimension_count": (64, U32)}, "rope.dimension_count 64 exceeds the head size 16"),
    ({"tokenizer.ggml.scores": ([0.0] * 3, gguf.GGUFValueType.ARRAY)}, "tokenizer.ggml.scores is an array of 3"),
])
def test_what_llama_cpp_trusts_is_checked_first(tiny_target, tmp_path, keys, words):
    """Values of a target that llama.cpp asserts on (found by the fuzz test) are refused before it loads the file."""
    with pytest.raises(UserError, match=words):
        check_target_file(edit_gguf(tiny_target("llama"), tmp_path / "t.gguf", keys=keys))
    duplicate = tmp_path / "duplicate-token.gguf"
    duplicate.write_bytes(tiny_target("llama").read_bytes().replace(b"<0x25>", b"<0x24>", 1))
    with pytest.raises(UserError, match="has the same token twice"):
        check_target_file(duplicate)
