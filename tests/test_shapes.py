"""bench/shapes.py (mission-size random targets and drafters, scaled down here) and bench/pass_costs.py: the files
load in llama.cpp and the native helper, DFlash gives the target's own greedy text on them, random quantized blocks
keep the weights' spread, and the per-pass costs come out whole."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from dflash_local.cli import app
from dflash_local.synthetic.weights import Q, RandomBlocks
from dflash_local.target import Target, TargetParams

BENCH = Path(__file__).resolve().parents[1] / "bench"
SHAPES = ("qwen35-27b", "qwen3-8b")


def _script(name: str, *args: object) -> str:
    # -P: the installed dflash_local (with its native helper), not the source tree
    out = subprocess.run([sys.executable, "-P", str(BENCH / name), *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Both shapes at scale 0.05 in Q8_0 (exact on a CPU: passes of several tokens round as one-token passes), one
    in Q4_K_M, and 64-token prompts."""
    out = tmp_path_factory.mktemp("shapes")
    for shape in SHAPES:
        _script("shapes.py", "--shape", shape, "--scale", "0.05", "--quant", "q8_0", "--out", out,
                "--context-prompts", "64")
    _script("shapes.py", "--shape", "qwen35-27b", "--scale", "0.05", "--out", out)
    return out


def _run(*args: object):
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_shape_runs_with_identity(shapes, shape):
    target = shapes / f"{shape}-x0.05.Q8_0.gguf"
    drafter = shapes / f"{shape}-x0.05.Q8_0-dflash.gguf"
    assert target.stat().st_size < 16e6 and drafter.stat().st_size < 4e6  # a few MB
    alone = _run(target, "--no-draft", "-p", "hi", "-n", "8", "-t", "1")
    drafted = _run(target, "--drafter", drafter, "-p", "hi", "-n", "8", "-t", "1")
    assert alone.exit_code == 0 and drafted.exit_code == 0, drafted.output
    assert alone.stdout.strip() and alone.stdout == drafted.stdout
    # every step verifying a chain of drafts, a third of them accepted on average (a hybrid's snapshots roll back)
    out = shapes / f"bench-{shape}.json"
    res = CliRunner().invoke(app, ["bench", str(target), "--prompts", str(shapes / "prompts-ctx64.jsonl"), "-n", "2",
                                   "--max-tokens", "48", "--block-sizes", "16", "-c", "256", "-t", "1", "--fixed",
                                   "--emulate-acceptance", "tau=6", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["prompts"][0]["prompt_tokens"] == 64
    run = next(r for r in doc["runs"] if r["mode"] == "dflash")
    assert run["tau"] > 3 and sum(run["accept_hist"][1:]) > 0


def test_q4_k_m_shape_loads(shapes):
    """The Q4_K_M mix loads and runs (on a CPU its passes of several tokens round otherwise: no identity asked)."""
    target = shapes / "qwen35-27b-x0.05.Q4_K_M.gguf"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(target).tensors}
    assert types["output.weight"] == Q.Q6_K and types["blk.3.ffn_down.weight"] == Q.Q6_K  # use_more_bits
    assert types["blk.0.ffn_down.weight"] == Q.Q4_K and types["blk.0.ssm_conv1d.weight"] == Q.F32
    res = _run(target, "--drafter", shapes / "qwen35-27b-x0.05.Q4_K_M-dflash.gguf", "-p", "hi", "-n", "8", "-t", "1")
    assert res.exit_code == 0 and res.stdout.strip(), res.output


def test_context_prompts_have_their_length(shapes):
    tg = Target(shapes / "qwen3-8b-x0.05.Q8_0.gguf", TargetParams(n_ctx=128, n_threads=1))
    try:
        lines = (shapes / "prompts-ctx64.jsonl").read_text().splitlines()
        assert len(lines) == 4 and all(len(tg.tokenize(json.loads(x)["prompt"])) == 64 for x in lines)
    finally:
        tg.close()


def test_full_size_trial_write(tmp_path):
    """The full 27B target's first bytes, written and timed, then removed: its size is the real Q4_K_M's."""
    out = _script("shapes.py", "--shape", "qwen35-27b", "--out", tmp_path, "--trial-bytes", "1e6")
    assert "the whole 16.2" in out and "min" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16])
def test_random_blocks_keep_the_spread(qtype):
    for std in (0.01, 0.5):
        blocks = RandomBlocks((64, 512), qtype, std, np.random.default_rng(0))
        f = io.BytesIO()
        blocks.tofile(f)
        assert f.tell() == blocks.nbytes
        w = gguf.quants.dequantize(np.frombuffer(f.getvalue(), np.uint8).reshape(blocks.shape), qtype)
        assert w.shape == (64, 512) and np.isfinite(w).all()
        assert w.std() == pytest.approx(std, rel=0.02) and abs(w.mean()) < 0.05 * std


def test_pass_costs(shapes, tmp_path):
    target = shapes / "qwen35-27b-x0.05.Q8_0.gguf"
    out = tmp_path / "costs.json"
    _script("pass_costs.py", target, shapes / "qwen35-27b-x0.05.Q8_0-dflash.gguf", "--context", "32",
            "--sizes", "1,2,4", "--repeats", "1", "-t", "1", "--json", out)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dflash-pass-costs/1" and doc["target"]["recurrent"] and doc["command"]
    assert {"cpu", "gpus"} <= doc["machine"].keys() and "git" in doc
    ms = doc["ms"]
    assert set(ms["target_alone"]) == {"1"}  # the target alone passes one token at a time
    for key in ("verify_capture", "verify_no_capture", "rollback", "inject"):
        assert set(ms[key]) == {"1", "2", "4"}
    assert all(v > 0 for by_k in ms.values() for v in by_k.values())
    assert set(ms["draft"]) == {"2", "4"} and set(doc["policy_step_ms"]) == {"0", "1", "3", "7", "15"}
    mem = doc["memory"]
    assert mem["n_rs_seq"] == 16 and mem["snapshots_mb"] == pytest.approx(16 * mem["recurrent_state_mb"])
    assert mem["recurrent_state_mb"] > 0
    assert doc["bound_speedup"]["tau=7.7"]["4"]["tau"] > doc["bound_speedup"]["tau=3.4"]["4"]["tau"]
