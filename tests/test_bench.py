"""`dflash bench` on a tiny random target and drafter: the table, the JSON, the plot, the prompt sets,
the identity check that fails the bench, and the parsing of upstream llama.cpp's log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic_drafters import random_drafter_gguf
from typer.testing import CliRunner

from dflash_local.bench import runner
from dflash_local.bench.divergence import classify
from dflash_local.bench.llamacpp import command, failure_reason, parse
from dflash_local.bench.prompts import load_prompts
from dflash_local.cli import app
from dflash_local.engine import Engine
from dflash_local.errors import UserError
from dflash_local.model_registry import DEFAULT_MODEL, MODELS
from dflash_local.target import Target, TargetParams

UPSTREAM_LOG = """\
0.01.807.364 I encoded   23 tokens in    0.066 seconds, speed:   75.775 t/s
0.01.807.378 I decoded   33 tokens in    1.352 seconds, speed:   12.571 t/s
0.01.807.389 I n_draft   = 3
0.01.807.394 I n_predict = 33
0.01.807.399 I n_drafted = 48
0.01.807.404 I n_accept  = 9
"""


@pytest.fixture(scope="module")
def models(tiny_target, tmp_path_factory) -> tuple[Path, Path]:
    target = tiny_target("llama")
    return target, random_drafter_gguf(target, tmp_path_factory.mktemp("bench") / "drafter.gguf")


def _bench(models: tuple[Path, Path], tmp_path: Path, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nOnce upon a time there was\n")
    args = ["bench", str(models[0]), "-d", str(models[1]), "--prompts", str(prompts), "-n", "2",
            "--max-tokens", "16", "--block-sizes", "2,4", "-c", "256", "-t", "1", *extra]
    return CliRunner().invoke(app, args)


def test_bench_table_json_plot(models, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    res = _bench(models, tmp_path, "--fixed", "--json", str(out_json), "--plot", str(out_png),
                 "--label", "random drafter")
    assert res.exit_code == 0, res.output
    for row in ("target", "dflash-2", "dflash-4", "decode t/s", "speedup", "bound t/s", "passes by drafts accepted"):
        assert row in res.output
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "dflash-bench/1" and doc["ok"] and doc["mismatches"] == []
    assert doc["label"] == "random drafter" and doc["command"].split()[0] == "dflash"  # argv is pytest's here
    assert {"cpu", "cores", "gpus", "ggml_devices"} <= doc["machine"].keys()
    assert doc["target"]["size_bytes"] > 0 and doc["drafter"]["block_size"] == 16
    settings = doc["settings"]
    assert settings["block_sizes"] == [2, 4] and settings["n_prompts"] == 2 and not settings["adaptive"]
    assert doc["memory"]["peak_rss_mb"] > 0 and settings["threads_used"] == 1
    runs = {r["key"]: r for r in doc["runs"]}
    assert runs.keys() == {"target", "dflash-2", "dflash-4"}
    assert runs["target"]["speedup"] == pytest.approx(1.0)
    assert runs["target"]["bound_tps"] is None and runs["target"]["fraction_of_bound"] is None
    for key in ("dflash-2", "dflash-4"):
        r = runs[key]
        assert r["generated"] == runs["target"]["generated"] and r["decode_tps"] > 0 and r["tau"] >= 1.0
        # the bound: tau / (target + drafter seconds a pass), which the rest of the decode time keeps us below (but for
        # each prompt's first token, which comes with the prefill: an eighth of 16 tokens here)
        per_pass = (r["t_target"] + r["t_draft"] + r["t_inject"]) / r["passes"]
        assert r["bound_tps"] == pytest.approx(r["tau"] / per_pass) and 0.3 < r["fraction_of_bound"] < 1.2
        assert r["drafter_ms_per_pass"] == pytest.approx(1e3 * (r["t_draft"] + r["t_inject"]) / r["passes"])
        t_one = runs["target"]["t_target"] / runs["target"]["passes"]
        assert r["bound_speedup"] == pytest.approx(r["bound_tps"] * t_one) and not r["emulated_acceptance"]
        # passes that drafted nothing (the last token of a budget) are left out
        assert len(r["accept_hist"]) == r["block_size"] and 0 < sum(r["accept_hist"]) <= r["passes"]
        assert {"draft", "target", "capture", "inject", "other"} <= r["shares"].keys()
    assert [p["prompt_tokens"] > 0 for p in doc["prompts"]] == [True, True]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_emulated_acceptance(models, tmp_path):
    """The drafter's drafts replaced by the target's text cut at lengths drawn from a profile: the runs say so, accept
    about the profile's mean, and the target's text stays."""
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    res = _bench(models, tmp_path, "--fixed", "--block-sizes", "8", "--max-tokens", "48", "--emulate-acceptance",
                 "tau=5", "--label", "mine", "--json", str(out_json), "--plot", str(out_png))
    assert res.exit_code == 0, res.output
    assert "dflash-8 (emulated acceptance)" in res.output and "emulated acceptance tau=5" in res.output
    doc = json.loads(out_json.read_text())
    assert doc["ok"] and doc["label"] == "mine; emulated acceptance tau=5 (tau 5.00)"
    assert doc["settings"]["emulated_acceptance"]["tau"] == pytest.approx(5.0) and doc["settings"]["tree_size"] == 0
    run = next(r for r in doc["runs"] if r["mode"] == "dflash")
    assert run["key"] == "dflash-8 (emulated acceptance)" and run["emulated_acceptance"]
    assert run["tau"] > 2.5 and run["bound_tps"] > 0  # tau 5 cut to a block of 8 drafts is ~4.3
    assert "dflash-8 (emulated acceptance)" in doc["prompts"][0]["runs"]
    assert any("emulated acceptance" in note for note in doc["notes"])
    res = _bench(models, tmp_path, "--emulate-acceptance", "tau=5", "--compare-llama-cpp", str(tmp_path))
    assert res.exit_code == 2 and "do not go together" in res.output


def test_bench_default_model(tmp_path):
    """No target: the default built-in model with its shipped drafter."""
    prompts, out_json = tmp_path / "prompts.txt", tmp_path / "r.json"
    prompts.write_text("The quick brown fox\n")
    res = CliRunner().invoke(app, ["bench", "--prompts", str(prompts), "-n", "1", "--max-tokens", "8", "--block-sizes",
                                   "4", "-c", "256", "-t", "1", "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out_json.read_text())
    assert doc["ok"] and doc["target"]["name"] == MODELS[DEFAULT_MODEL].file_name
    assert doc["drafter"]["name"] == MODELS[DEFAULT_MODEL].drafter


def test_mismatch_detected():
    assert runner.find_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert runner.find_mismatch([1, 2, 3], [1, 2, 4]) == 2
    assert runner.find_mismatch([1, 2, 3], [1, 2]) == 2
    mm = runner.check("HumanEval/7", 4, [5, 6, 7, 8], [5, 6, 9, 8])
    assert (mm.prompt_id, mm.block_size, mm.index, mm.expected, mm.got) == ("HumanEval/7", 4, 2, [7, 8], [9, 8])


def test_a_divergence_at_one_thread_is_never_rounding(smollm2_path):
    """At one CPU thread a pass of several tokens gives the one-token passes' logits bit for bit (bound 0), so a
    DFlash token other than the target's own is a failure, however close the two were."""
    tg = Target(smollm2_path, TargetParams(n_ctx=512, n_threads=1))
    try:
        prompt = tg.tokenize("def add(a, b):")
        expected = Engine(tg).generate(prompt, 24).tokens
        tg.clear()
        tg.decode(prompt + expected[:12], 0, all_logits=False)
        second = int(np.argsort(tg.logits(1)[0])[-2])  # the target's second-best token for expected[12]
        got = expected[:12] + [second]
        div = classify(tg, prompt, expected, got, 12, width=16)
        assert div.gap is not None and div.gap > 0 and div.bound == 0.0 and div.batch_picks_dflash is False
        assert not div.rounding
        # a text that ends early ended on an end-of-generation token: classified as any other token
        ended = classify(tg, prompt, expected, expected[:5], 5, width=16)
        assert ended.gap is not None and ended.gap > 0 and ended.bound == 0.0 and not ended.rounding

        # near the start of the text the bound still comes from a whole batch, which rounds as DFlash's pass did
        widths: list[int] = []
        decode = tg.decode
        tg.decode = lambda tokens, *args, **kw: (widths.append(len(tokens)), decode(tokens, *args, **kw))[1]
        classify(tg, prompt, expected, expected[:1] + [second], 1, width=16)
        assert max(widths[1:]) == 16, widths  # after the prompt's pass
    finally:
        tg.close()


def test_a_hybrid_divergence_is_classified(tiny_target):
    """A hybrid's recurrent state cannot be cut back to where the batch starts: it is saved there and restored, so the
    batch runs on the state the one-token passes had (its logits within rounding of theirs), and a DFlash token far
    from the target's own is a failure."""
    tg = Target(tiny_target("qwen35"), TargetParams(n_ctx=256, n_threads=1))
    try:
        assert tg.recurrent
        prompt = tg.tokenize("The quick brown fox")
        expected = Engine(tg).generate(prompt, 40).tokens
        for index in (3, 30):  # a batch from the text's start, and one from within it
            tg.clear()
            tg.decode(prompt + expected[:index], 0, all_logits=False)
            worst = int(np.argmin(tg.logits(1)[0]))
            div = classify(tg, prompt, expected, expected[:index] + [worst], index, width=16)
            assert div.bound is not None and div.bound < 1e-3 and div.batch_picks_dflash is False, div
            assert div.gap > 1.0 and not div.rounding
    finally:
        tg.close()


def test_mismatch_fails_the_bench(models, tmp_path, monkeypatch):
    real = runner.generate_in_job

    def wrong_dflash(engine, tokens, n):
        gen = real(engine, tokens, n)
        if engine.drafter is not None and len(gen.tokens) > 3:
            gen.tokens[3] += 1  # a deliberate bug: not a token the target chose
        return gen

    monkeypatch.setattr(runner, "generate_in_job", wrong_dflash)
    out_json = tmp_path / "r.json"
    res = _bench(models, tmp_path, "--block-sizes", "2", "--json", str(out_json))
    assert res.exit_code == 1
    assert "MISMATCH" in res.output and "prompts/0" in res.output and "FAILED" in res.output
    doc = json.loads(out_json.read_text())
    assert not doc["ok"] and {m["prompt_id"] for m in doc["mismatches"]} == {"prompts/0", "prompts/1"}


def test_prompt_sets(tmp_path):
    he = load_prompts("humaneval", 3)
    assert [p.id for p in he] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert not he[0].chat and he[0].text.startswith("from typing import List")
    assert len(load_prompts("humaneval", 1000)) == 164
    chat = load_prompts("chat", 100)
    assert len(chat) == 20 and all(p.chat for p in chat)
    assert not load_prompts("chat", 1, chat=False)[0].chat
    f = tmp_path / "set.jsonl"
    f.write_text('{"id": "a", "prompt": "x"}\n\n{"question": "y"}\n{"turns": ["z", "w"], "question_id": 9}\n')
    assert [(p.id, p.text) for p in load_prompts(str(f), 10)] == [("a", "x"), ("set/1", "y"), ("9", "z")]
    f.write_text('{"prompt": "def f():", "chat": false}\n{"prompt": "hi"}\n')
    assert [p.chat for p in load_prompts(str(f), 10)] == [False, True]  # a line's own "chat", else the default
    assert [p.chat for p in load_prompts(str(f), 10, chat=True)] == [True, True]
    f.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(UserError, match="set.jsonl:2: not a JSON object"):
        load_prompts(str(f), 10)


def test_upstream_command_and_log(models):
    cfg = runner.BenchConfig(models[0], models[1], [], 32, [16], TargetParams(n_ctx=512, n_threads=2))
    cmd = command(Path("llama-speculative-simple"), cfg, 16, "hi\n", 2)
    joined = " ".join(cmd)
    assert "--spec-type draft-dflash" in joined and "--spec-draft-n-max 15" in joined and "-n 32" in joined
    assert cmd[cmd.index("-p") + 1] == "hi\n" and "-t 2 -td 2" in joined and "-ngld 0" in joined
    assert parse(UPSTREAM_LOG) == {"encoded": 23, "t_encoded": 0.066, "decoded": 33, "t_decoded": 1.352,
                                   "n_accept": 9}
    with pytest.raises(ValueError, match="decoded"):
        parse("encoded 3 tokens in 0.1 seconds")
    # how upstream failed on a qwen2 target (an H100, 2026-12-06): the reason, not the backtrace's addresses
    aborted = ("0.00.936.728 I common_speculative_impl_draft_dflash: - block_size=16, mask_token_id=151935\n"
               "/src/llama-graph.cpp:1384: GGML_ASSERT(t_layer_inp[il] != nullptr && \"layer input tensor is null\") "
               "failed\nlibggml-base.so.0(ggml_print_backtrace+0x21c)[0x7fa9c9524dbc]\n"
               "llama-speculative-simple(+0x34b1da)[0x560b178341da]\n")
    assert failure_reason(aborted).endswith('GGML_ASSERT(t_layer_inp[il] != nullptr && "layer input tensor is null") '
                                            "failed")
