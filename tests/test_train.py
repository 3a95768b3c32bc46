"""`dflash train` on a tiny random target: the dataset the target writes, a few training steps, the GGUF export
against the native drafter, and the command end to end."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dflash_local.bench.prompts import Prompt, load_prompts
from dflash_local.cli import app
from dflash_local.convert.gguf_io import load_drafter_gguf, save_drafter_gguf, target_embeddings
from dflash_local.convert.gguf_target import read_target
from dflash_local.errors import UserError
from dflash_local.native import Drafter as NativeDrafter
from dflash_local.reference import Drafter
from dflash_local.target import Target, TargetParams
from dflash_local.train import answers, trainer
from dflash_local.train.data import FEATURES, SCALES, Dataset, prompt_key
from dflash_local.train.prompts import prompt_group, training_prompts
from dflash_local.train.target_layers import auto_target_layers, parse_target_layers
from tiny_targets import write_tiny_target

PROMPTS = [Prompt("a", "The quick brown fox", True), Prompt("b", "Once upon a time there was", True),
           Prompt("c", "what is the water like", True), Prompt("d", "def how_to_make_it():", False)]
LAYERS = (1, 3)
N_NEW = 24


@pytest.fixture(scope="module")
def target(tiny_target) -> Path:
    return tiny_target("llama")


def _open(target: Path, n_seq: int = 1, capture: bool = True) -> Target:
    """The tiny target; without capture as `dflash train` answers and writes requests."""
    return Target(target, TargetParams(n_ctx=256, n_threads=2, n_seq=n_seq), capture_layers=LAYERS if capture else ())


def _fill(target: Path, root: Path, prompts: list[Prompt], capture: bool = True) -> tuple[Dataset, int, int]:
    """Answer the prompts not yet in the dataset at root, then capture the features it lacks (unless not capture);
    returns the dataset and how many were answered and captured."""
    from rich.progress import Progress

    tg = _open(target, n_seq=3, capture=False)  # 3 answers at a time: 4 prompts also reuse a finished sequence's slot
    try:
        ds = Dataset(root, target, LAYERS, tg.n_embd)
        todo, _ = answers.plan(tg, prompts, ds, N_NEW)
        with Progress(disable=True) as progress:
            answers.answer(tg, todo, ds, N_NEW, progress)
    finally:
        tg.close()
    return ds, len(todo), _capture(target, ds) if capture else 0


def _capture(target: Path, ds: Dataset, n_batch: int = 512) -> int:
    """Capture as `dflash train` does (all the sequences of PROMPTS fit one batch of 512); returns how many."""
    from rich.progress import Progress

    params = answers.capture_params(TargetParams(n_ctx=256, n_batch=n_batch, n_threads=2))
    tg = Target(target, params, capture_layers=LAYERS)
    try:
        with Progress(disable=True) as progress:
            return answers.capture(tg, ds, progress).sequences
    finally:
        tg.close()


@pytest.fixture(scope="module")
def dataset(target, tmp_path_factory) -> Dataset:
    return _fill(target, tmp_path_factory.mktemp("data"), PROMPTS)[0]


def _features(ds: Dataset) -> np.ndarray:
    """The data set's features as float32, as the trainer reads them."""
    return trainer.decode_features(*(torch.from_numpy(a) for a in ds.arrays()[1:3])).numpy()


def test_dataset_holds_the_targets_own_greedy_answers(target, dataset):
    tokens, codes, scales, starts = dataset.arrays()
    assert codes.shape == (dataset.n_rows, len(LAYERS) * 64) and codes.dtype == np.uint8
    assert scales.shape == (dataset.n_rows, len(LAYERS)) and scales.dtype == np.float32
    features = _features(dataset)
    assert len(dataset.sequences) == len(PROMPTS) and tokens.shape == (dataset.n_rows,)
    tg = _open(target)
    try:
        by_key = {prompt_key(p.text, p.chat): p for p in PROMPTS}  # answers are stored in the order they finish
        for start, seq in zip(starts, dataset.sequences):
            prompt = by_key[seq.key]
            tok = tokens[start:start + seq.n_tokens].tolist()
            assert tok[:seq.n_prompt] == answers.prompt_tokens(tg, prompt)
            _assert_greedy(tg, tok, seq.n_prompt)
            want = tg.features()
            got = features[start:start + seq.n_tokens]
            # captured 4 sequences to a batch: ggml's CPU matmul rounds a batch of some 120 rows otherwise than one of
            # 30 (seen 0.7 % of the largest value; the first 30 rows of a 116-token prefill differ as much), where a
            # wrong row or layer would be off by O(1); float8 rounds to 1/16 of a value at most
            np.testing.assert_allclose(got, want, rtol=1 / 16 + 2e-3, atol=1e-2 * np.abs(want).max())
    finally:
        tg.close()


def _assert_greedy(tg: Target, tokens: list[int], n_prompt: int) -> None:
    """Every answer token is the target's argmax after the tokens before it (in one prefill of them all)."""
    assert 0 < len(tokens) - n_prompt <= N_NEW
    tg.clear()
    logits = tg.decode(tokens, 0, all_logits=True)[n_prompt - 1:-1]
    chosen = logits[np.arange(len(logits)), tokens[n_prompt:]]
    assert (chosen == logits.max(1)).all()


def test_continuations_end_where_stop_says(target):
    """continue_prompts' stop ends a continuation at the first token where it holds (as write_problems.py ends an
    exercise where its code block closes): each is the greedy continuation cut there."""
    def continuations(stop):
        pending, outs = iter(todo), {}
        answers.continue_prompts(tg, lambda: next(pending, None), lambda seqs: tg.logits(len(seqs)).argmax(axis=1),
                                 N_NEW, lambda item, out: outs.__setitem__(item.key, out), stop)
        return outs

    tg = _open(target, capture=False)  # one sequence at a time: the same rounding in both runs
    try:
        todo = [answers.Todo(p.id, p.id, answers.prompt_tokens(tg, p)) for p in PROMPTS]
        full, cut = continuations(None), continuations(lambda out: len(out) >= 3)
    finally:
        tg.close()
    assert len(cut) == len(PROMPTS) and max(map(len, full.values())) > 3
    assert all(cut[k] == full[k][:3] for k in full)


def test_target_writes_requests_then_answers_them(target, tmp_path):
    """--self-prompts: the target writes chat requests under its own template (sampled), then answers them greedily
    as any chat prompt; a run that resumes writes only those still missing."""
    from rich.progress import Progress

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "<|im_start|>assistant\n")
    chat_target = write_tiny_target("llama", tmp_path / "chat.gguf", chat_template=chatml)
    tg = _open(chat_target, n_seq=2, capture=False)
    try:
        ds = Dataset(tmp_path / "data", chat_target, LAYERS, tg.n_embd)
        with Progress(disable=True) as progress:
            requests = answers.write_requests(tg, 3, ds, N_NEW, progress)
            assert len(requests) == 3 and len({r.key for r in requests}) == 3
            todo = answers.spread(answers.plan(tg, PROMPTS[:1], ds, N_NEW)[0], requests)
            assert len(todo) == 4 and todo[-1] == requests[-1]
            answers.answer(tg, todo, ds, N_NEW, progress)
        assert answers.request_head(tg) == tg.tokenize("<|im_start|>user\n")
        written = [s for s in ds.sequences if s.group.startswith(answers.SELF_GROUP)]
        assert {s.group for s in written} == {r.group for r in requests}
        tokens, starts = np.fromfile(tmp_path / "data" / "tokens.i32", np.int32), ds._offsets()
        for start, seq in zip(starts, ds.sequences):
            tok = tokens[start:start + seq.n_tokens].tolist()
            if seq in written:  # the request under the chat template, tokenized as a user's request would be
                assert tok[:seq.n_prompt] == next(r.prompt for r in requests if r.key == seq.key)
                text = b"".join(tg.piece(t) for t in tok[:seq.n_prompt]).decode(errors="replace")
                assert text.lstrip().startswith("<|im_start|>user\n")
                assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and len(text) > 50
            _assert_greedy(tg, tok, seq.n_prompt)
        assert answers.requests_missing(ds, 3) == 0 and answers.requests_missing(ds, 4) == 1
    finally:
        tg.close()
    plain = _open(target)
    try:
        with pytest.raises(UserError, match="no chat template"):
            answers.max_rows(plain, [], 1, N_NEW)
    finally:
        plain.close()


def test_requests_are_min_p_samples(target):
    """The target's own requests are sampled in llama.cpp's graph at temperature 1 among the tokens within
    REQUEST_MIN_P of the likeliest: the first token after a prompt, drawn 600 times, against the probabilities its
    logits give, renormalised over those tokens."""
    n = 600
    tg = _open(target, n_seq=2, capture=False)
    try:
        def kept_probs(prompt: list[int]) -> np.ndarray:
            tg.clear()
            logits = tg.decode(prompt, 0, all_logits=False)[0].astype(np.float64)
            p = np.exp(logits - logits.max())
            p[p < answers.REQUEST_MIN_P] = 0
            return p / p.sum()

        # the prompt whose next token is least certain, so that the draws have several tokens to pick from
        prompt = max((tg.tokenize(t) for t in ("a", "b", "c", "the", "once", "water", "x =")),
                     key=lambda t: -np.max(kept_probs(t)))
        want = kept_probs(prompt)
        assert want.max() < 0.9
        assert tg.sample_on_device(answers.REQUEST_MIN_P, seed=1)
        draws = []
        for _ in range(n):
            tg.clear(1)
            tg.decode(prompt, 0, all_logits=False, seq=1)
            draws.append(int(tg.sampled([1])[0]))
        assert tg.sample_on_device(None)
        np.testing.assert_allclose(np.bincount(draws, minlength=len(want)) / n, want, atol=0.07)
        np.testing.assert_array_equal(kept_probs(prompt), want)  # the logits come back again
    finally:
        tg.close()


@pytest.mark.parametrize("n_batch", [64, 16])  # two sequences to a batch; each alone, longer than a batch
def test_capture_packs_sequences_in_order(target, dataset, tmp_path, n_batch):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("index.json", "tokens.i32"):
        (root / name).write_bytes((dataset.root / name).read_bytes())
    ds = Dataset(root, target, LAYERS, 64)
    assert _capture(target, ds, n_batch) == len(PROMPTS)
    want, got = _features(dataset), _features(ds)
    # as above, where float8 may round each the other way: a step of 1/8 of a value at most
    np.testing.assert_allclose(got, want, rtol=1 / 8 + 2e-3, atol=1e-2 * np.abs(want).max())


def test_dataset_resumes_without_redoing_work(target, tmp_path):
    root = tmp_path / "data"
    ds, n, captured = _fill(target, root, PROMPTS[:2])
    assert n == captured == 2
    # a write cut short leaves rows past the index: they are dropped on reopening
    with open(root / FEATURES, "ab") as f:
        f.write(b"\0" * 1000)
    ds2, n, captured = _fill(target, root, PROMPTS[:3])
    assert n == captured == 1 and len(ds2.sequences) == 3
    assert ds2.sequences[:2] == ds.sequences
    assert (root / FEATURES).stat().st_size == ds2.n_rows * ds2.width
    assert (root / SCALES).stat().st_size == ds2.n_rows * 4 * len(LAYERS)
    with pytest.raises(UserError, match="another target or layer choice"):
        Dataset(root, target, (2,), 64)


def test_answers_alone_travel_and_get_their_features_again(target, dataset, tmp_path):
    """index.json and tokens.i32 are a whole data set once the features are captured again, here for the first
    time for the last answer, which has none yet."""
    root = tmp_path / "data"
    ds, n, captured = _fill(target, root, PROMPTS, capture=False)
    assert n == 4 and captured == 0 and ds.captured == 0
    with pytest.raises(UserError, match="4 sequences have no features yet"):
        ds.arrays()
    (root / FEATURES).unlink()
    (root / SCALES).unlink()
    ds, _, captured = _fill(target, root, PROMPTS)
    assert captured == 4 and ds.captured == 4
    assert ds.sequences == dataset.sequences  # the same greedy answers, in the same order
    want, got = dataset.arrays(), ds.arrays()
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_target_layers():
    assert auto_target_layers(36) == (2, 10, 18, 26, 34)  # z-lab's [1, 9, 17, 25, 33] for 36 layers, + 1
    assert auto_target_layers(30) == (2, 8, 15, 22, 28)
    for depth in range(2, 40):
        ids = auto_target_layers(depth)
        assert 1 <= min(ids) and max(ids) <= depth - 1 and len(ids) == min(5, max(depth - 3, 1))
    assert parse_target_layers("3,1", 4) == (3, 1)
    for bad in ("4", "0,1", "1,1", "x"):
        with pytest.raises(UserError):
            parse_target_layers(bad, 4)


def _signatures(prompts: list[Prompt]) -> set[str]:
    return {line.strip() for p in prompts for line in p.text.splitlines() if line.lstrip().startswith("def ")}


def _stripped(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())


def test_training_prompts_are_many_and_leave_the_benchmarks_out():
    builtin = training_prompts(["builtin"])
    train = [p.text for p in builtin]
    assert len(train) >= 300 and len(set(train)) == len(train)
    assert not set(train) & {p.text for p in load_prompts("chat", 1000)}
    humaneval = load_prompts("humaneval", 164)
    # our raw-completion stubs share no function name with HumanEval; the stdlib's (statistics.median...) share
    # a few generic names but no signature
    names = {sig.split("(")[0][4:] for sig in _signatures([p for p in builtin if not p.chat])}
    assert len(names) >= 100 and not {n for n in names if f"def {n}(" in "\n".join(p.text for p in humaneval)}
    stdlib = training_prompts(["stdlib"])
    assert len(stdlib) >= 2000 and not _signatures(stdlib) & _signatures(humaneval)
    # each stub as raw completion after the module's imports, in a chat request, and alone (where that differs)
    by_id = {p.id: p for p in stdlib}
    unique = collections.Counter(p.id for p in stdlib)  # a few functions are defined twice in one file
    raw = [p for p in stdlib if not p.id.endswith(("/bare", "/chat")) and unique[p.id] == 1]
    chat = [by_id[f"{r.id}/chat"] for r in raw]
    bare = [(r, by_id[f"{r.id}/bare"]) for r in raw if f"{r.id}/bare" in by_id]
    assert len(bare) > 0.8 * len(raw)
    assert not any(p.chat for p in raw) and all(p.chat for p in chat)
    assert all(f"```python\n{r.text}```" in c.text for r, c in zip(raw, chat))
    assert all(not b.chat and b.text.startswith(("\ndef ", "\n@")) and _stripped(r.text).endswith(_stripped(b.text))
               for r, b in bare)
    both = training_prompts(["builtin", "stdlib", "builtin"])
    assert len(both) == len({(p.text, p.chat) for p in builtin + stdlib})
    assert training_prompts(["stdlib", "builtin"], 5) == stdlib[:5]
    # any folder of Python code: numpy's, here
    code = training_prompts([str(Path(np.__file__).parent)])
    assert len(code) >= 200 and code[0].id.startswith("numpy/")
    # held-out groups: a stub file (all forms of its stubs), or a prompt alone
    assert (prompt_group(raw[0]) == prompt_group(bare[0][1]) == prompt_group(chat[0]) == prompt_group(raw[1])
            == raw[0].id.split(":")[0][:-3])
    assert len({prompt_group(p) for p in builtin}) == len(builtin)
    assert not _signatures(code) & _signatures(humaneval)
    with pytest.raises(UserError, match="benchmark set"):
        training_prompts(["builtin", "humaneval"])


def _trainer(target: Path, dataset: Dataset, block_size: int = 8, lr: float = 3e-3,
             n_ff: int | None = None) -> trainer.Trainer:
    torch.manual_seed(0)
    cfg = trainer.drafter_config(target, 1, LAYERS, block_size, n_ff)
    opts = trainer.TrainOptions(steps=100, batch=2, anchors=8, lr=lr, seed=0)
    return trainer.Trainer(Drafter(cfg, *target_embeddings(target)), dataset, opts, torch.device("cpu"))


def test_training_steps_lower_the_loss(target, dataset):
    tr = _trainer(target, dataset)
    batch = tr.sample()
    assert batch.tokens.shape[2] == 8 and (batch.tokens[..., 1:] == tr.drafter.cfg.mask_token_id).all()
    # context: the positions before the last anchor, rounded up
    assert 0 <= batch.features.shape[1] - batch.anchors.max() < trainer.CONTEXT_MULTIPLE
    assert batch.features.shape[1] % trainer.CONTEXT_MULTIPLE == 0
    first = tr.step(batch)[0]
    for _ in range(15):
        last = tr.step(batch)[0]
    assert last < 0.6 * first


def test_held_out_tau_simulates_greedy_decoding(target, dataset):
    # passes anchored at answer positions 0, 3 and 9: 11 tokens in 3 passes
    assert trainer.decoding_tau([2, 0, 0, 5, 0, 0, 0, 0, 0, 1]) == 11 / 3
    tr = _trainer(target, dataset, block_size=8)
    seq = tr.seqs[0]
    start, n_prompt, n = seq
    for _ in range(40):  # learn this answer by heart, so that blocks accept drafts
        tr.step(tr.blocks([(start, n, np.arange(n_prompt, n - 1))]))
    # the drafts the engine would get accepted, one block at a time, each seeing the features before its anchor
    d, tokens, acc = tr.drafter.eval(), torch.from_numpy(tr.tokens[start:start + n].astype(np.int64)), []
    for a in range(n_prompt, min(n - 1, n_prompt + trainer.WALK_TOKENS)):
        block = torch.full((1, 8), d.cfg.mask_token_id)
        block[0, 0] = tokens[a]
        with torch.no_grad():
            context = trainer.decode_features(tr.codes[start:start + a], tr.scales[start:start + a])
            hidden = d.hidden_batch(context, torch.tensor([a]), block)
            drafts = hidden[0, 1:] @ d.lm_head.T
        k = 0
        while k < 7 and a + 1 + k < n and drafts[k].argmax() == tokens[a + 1 + k]:
            k += 1
        acc.append(k)
    assert max(acc) > 0
    assert tr.held_out_tau([seq]) == pytest.approx(trainer.decoding_tau(acc))


def test_export_matches_native_drafter(target, dataset, tmp_path):
    # an FFN narrower than the target's (192), as --ffn gives: the native helper reads its width from the GGUF
    tr = _trainer(target, dataset, block_size=16, n_ff=40)
    for _ in range(3):
        tr.step(tr.sample())
    drafter = tr.drafter.eval()
    out = save_drafter_gguf(drafter, tmp_path / "d.gguf", target, outtype="f32")
    loaded = load_drafter_gguf(out, target)
    for name, t in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name

    tokens, ctx = dataset.arrays()[0], _features(dataset)[:9]
    nd = NativeDrafter(out, target, n_ctx=64, n_threads=2)
    try:
        assert nd.info.target_layers == LAYERS and nd.info.block_size == 16 and nd.info.n_ff == 40
        nd.inject(ctx, 0)
        anchor = int(tokens[9])
        got = nd.draft_logits(anchor)
    finally:
        nd.close()
    block = torch.tensor([anchor] + [drafter.cfg.mask_token_id] * 15)
    with torch.no_grad():
        want = loaded(torch.from_numpy(ctx), block)[1:].numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_cli_end_to_end_and_resume(target, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p.text, "chat": p.chat}) for p in PROMPTS))
    out = tmp_path / "d.gguf"
    args = ["train", str(target), "-o", str(out), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--layers", "1", "--ffn", "48", "--threads", "2", "--checkpoint-every", "2", "--eval", str(prompts),
            "--eval-prompts", "2"]
    result = _run_cli([*args, "--data-only"])
    assert result.returncode == 0, result.stdout
    assert "4 prompts to answer" in result.stdout and "4 sequences" in result.stdout and not out.exists()
    (tmp_path / "d-data" / "features.f16").write_bytes(b"\0" * 1000)  # as an earlier version left it
    result = _run_cli([*args, "--steps", "3"])
    assert result.returncode == 0, result.stdout
    assert "holds float16 features of an earlier version, no longer read" in " ".join(result.stdout.split())
    assert out.is_file() and out.with_suffix(".ckpt").is_file()
    assert "tau" in result.stdout and "0 prompts to answer (4 done" in result.stdout
    info = NativeDrafter(out, target).info
    assert info.target_layers == (2,) and info.n_ff == 48  # auto for a 4-layer target; --ffn

    result = _run_cli([*args, "--steps", "5", "--resume", "--eval", "none"])
    assert result.returncode == 0, result.stdout
    assert "0 prompts to answer (4 done" in result.stdout and "resuming from step 3" in result.stdout
    # a checkpoint past --steps only exports
    result = _run_cli([*args, "--steps", "2", "--resume", "--eval", "none", "--outtype", "q8_0"])
    assert result.returncode == 0, result.stdout
    assert "none: the checkpoint is at step 5" in result.stdout

    # another drafter starting from that one's weights (and its FFN width): with a learning rate of 0 it stays that
    # drafter
    again = tmp_path / "again.gguf"
    args.remove("--ffn")
    args.remove("48")
    result = _run_cli([*args, "-o", str(again), "--init", str(out), "--steps", "1", "--lr", "0", "--eval", "none",
                       "--outtype", "f32", "--data-dir", str(tmp_path / "d-data")])
    assert result.returncode == 0, result.stdout
    assert f"from {out}" in result.stdout.replace("\n", "")
    for name, t in load_drafter_gguf(out, target).state_dict().items():
        assert torch.equal(load_drafter_gguf(again, target).state_dict()[name], t), name
    result = _run_cli([*args, "--init", str(out), "--block-size", "8"])
    assert result.returncode == 2 and "give the same --target-layers, --block-size and --ffn" in " ".join(
        result.stdout.split()), result.stdout
    result = _run_cli([*args, "--init", str(out), "--ffn", "64"])
    assert result.returncode == 2 and "n_ff 48 (this run: 64)" in " ".join(result.stdout.split()), result.stdout


def test_init_grows_a_drafter_by_identity_layers(target, tmp_path):
    """--init with more --layers than the drafter has: the new layers come after its own and start as identities,
    so the grown drafter drafts what the given one did; fewer layers are refused."""
    from dflash_local.train.cli import initial_drafter

    torch.manual_seed(0)
    small = Drafter(trainer.drafter_config(target, 1, LAYERS, 8), *target_embeddings(target))
    save_drafter_gguf(small, tmp_path / "small.gguf", target, "f32")
    grown = initial_drafter(target, tmp_path / "small.gguf", 3, LAYERS, 8)
    assert grown.cfg.n_layer == 3
    features = torch.randn(20, small.cfg.n_extract * small.cfg.n_embd)
    anchors, blocks = torch.tensor([5, 12]), torch.randint(0, small.cfg.n_vocab, (2, 8))
    with torch.no_grad():
        assert torch.allclose(grown.forward_batch(features, anchors, blocks),
                              small.forward_batch(features, anchors, blocks), atol=1e-5)
    assert grown.layers[2].mlp.up_proj.weight.abs().sum() > 0  # random: the new layers can learn
    save_drafter_gguf(grown, tmp_path / "grown.gguf", target, "f32")
    with pytest.raises(UserError, match="has 3 layers: give --layers 3 or more"):
        initial_drafter(target, tmp_path / "grown.gguf", 2, LAYERS, 8)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`dflash` in a fresh process (this one has torch), which must not import torch: training runs in a child
    process (torch's and llama.cpp's CUDA builds crash in one process)."""
    script = ("import sys\nfrom dflash_local.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n"
              "    assert 'torch' not in sys.modules, 'the llama.cpp process imported torch'\n    raise\n")
    # -P: the installed dflash_local, not the source tree of the current folder
    return subprocess.run([sys.executable, "-P", "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


@pytest.mark.parametrize("args,code,message", [  # code 1: bad input, 2: usage
    (["missing.gguf"], 1, "target model not found"),
    (["{target}", "--target-layers", "4"], 2, "outside 1..3"),
    (["{target}", "--target-layers", "1,x"], 2, "comma-separated"),
    (["{target}", "--steps", "2", "--epochs", "1"], 2, "either --steps or --epochs"),
    (["{target}", "--prompts", "missing.jsonl"], 1, "missing.jsonl is none of them"),
    (["{target}", "--prompts", "{empty}"], 1, "no .py file under it has a documented public function"),
    (["{target}", "--self-prompts", "2"], 1, "no chat template"),
    (["{target}", "--init", "missing.gguf"], 1, "--init: drafter not found"),
])
def test_cli_bad_inputs(target, tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(target=target, empty=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(app, ["train", *args, "-o", str(tmp_path / "d.gguf")])
    assert result.exit_code == code, result.output
    assert message in result.output


def test_held_out_sequences_pick_the_exported_weights(target, tmp_path):
    from rich.progress import Progress

    rng = np.random.default_rng(0)
    ds = Dataset(tmp_path / "data", target, LAYERS, read_target(target).n_embd)
    for i in range(2 * trainer.HOLD_OUT):  # 48 sequences alone (a group each), then groups of 2
        ds.append(f"k{i}", f"g{i // 2}" if i >= 48 else f"k{i}", rng.integers(0, 100, 12).tolist(), 4)
        ds.append_features(rng.integers(0, 126, (12, ds.width), np.uint8), np.ones((12, len(LAYERS)), np.float32))
    tr = _trainer(target, ds)
    # held out: the 50th of the 74 groups, both its sequences (no near-copy of a held-out answer is trained on)
    assert len(tr.held_out) == 2 and len(tr.seqs) == 2 * trainer.HOLD_OUT - 2
    assert [r // 12 for r, _, _ in tr.held_out] == [50, 51]
    tr.opts.steps, tr.opts.checkpoint_every = 6, 2
    with Progress(disable=True) as progress:
        report = tr.run(tmp_path / "d.ckpt", progress)
    assert report.best_step in (2, 4, 6)

    # the exported weights are those of the best step, also after a resume from the checkpoint
    tr.use_best()
    best = {k: v.clone() for k, v in tr.drafter.state_dict().items()}
    assert tr.held_out_tau() == report.held_out_tau
    again = _trainer(target, ds)
    again.load(tmp_path / "d.ckpt")
    again.use_best()
    assert all(torch.equal(best[k], v) for k, v in again.drafter.state_dict().items())

    # weights given to start from (dflash train --init) are a candidate too: when no step beats them, they stay
    given = _trainer(target, ds, lr=0.0)
    given.opts.steps, given.opts.checkpoint_every = 4, 2
    with Progress(disable=True) as progress:
        report = given.run(tmp_path / "given.ckpt", progress, given_weights=True)
    assert report.best_step == 0 and report.held_out_tau == given.held_out_tau()


def test_a_deadline_sets_the_schedules_length(target, dataset, tmp_path):
    from rich.progress import Progress

    # a deadline already past: the first checkpoint shortens the schedule to one more step
    tr = _trainer(target, dataset)
    tr.opts.steps, tr.opts.checkpoint_every = 100, 3
    with Progress(disable=True) as progress:
        report = tr.run(tmp_path / "d.ckpt", progress, deadline=time.time() - 1)
    assert report.steps == tr.step_no == tr.opts.steps == 4
