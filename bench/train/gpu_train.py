"""`dflash train` on a GPU machine without a CUDA build of llama.cpp (one took 339 s of the lent H100's 30 minutes):
the target runs in torch (bench/train/torch_target.py, `llama` and `qwen2` archs) to answer the prompts and to compute
the features, which stay in GPU memory; nothing is written but the answers' tokens. Then the same Trainer as
`dflash train`, for as many steps as fit before --deadline, and the export. llama.cpp only tokenizes the prompts, in a
first run on any machine where it works (its CPU build crashed at the tokenizer's start on the lent H100s):

    python bench/train/gpu_train.py TARGET.gguf --data-dir DIR --prompts FILE [--prompts ...] --tokenize-to todo.pkl
    python bench/train/gpu_train.py TARGET.gguf -o DRAFTER.gguf --data-dir DIR [--todo todo.pkl --max-answers N
        --answer-seconds S] [--max-new-tokens 160] [--layers 6] [--batch 32] [--anchors 32] [--lr 1e-3]
        [--ffn N] [--init D.gguf] (--steps N | --deadline UNIX_TIME) [--checkpoint-every 1000] [--outtype q8_0]

DIR may hold sequences already (index.json and tokens.i32 of `dflash train` or of earlier runs): they are trained on
too. The prompts are answered in order, up to --answer-batch at a time, until --max-answers or --answer-seconds.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import Progress

Todo = tuple[str, str, list[int]]  # a prompt to answer: key and group of its sequence, tokens

if TYPE_CHECKING:
    import torch
    from torch_target import TorchTarget

    from dflash_local.convert.gguf_target import TargetInfo
    from dflash_local.train.data import Dataset
    from dflash_local.train.trainer import Trainer

FEATURE_TOKENS = 1 << 16  # padded tokens per batch of the feature pass
ANSWER_TOKENS = 1 << 19  # KV cache slots (prompt + answer) per batch of answers: 24 GB for SmolLM2 in float32
PROBE_STEPS = 300  # steps that measure the rate before the schedule is set to end at the deadline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--prompts", action="append", default=[])
    ap.add_argument("--max-answers", type=int, help="default: all")
    ap.add_argument("--answer-seconds", type=float, help="default: no limit")
    ap.add_argument("--answer-batch", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--target-layers", default="auto")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, help="the drafter's FFN width (default: --init's, else the target's)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--deadline", type=float, help="unix time by which training ends")
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--outtype", default="q8_0")
    ap.add_argument("--device", default="cuda", help="cpu: to try it on a small data set")
    ap.add_argument("--tokenize-to", type=Path, help="only tokenize the prompts (llama.cpp) into this file")
    ap.add_argument("--todo", type=Path, help="answer the prompts of --tokenize-to's file")
    a = ap.parse_args()
    if a.tokenize_to:
        importlib.import_module("llama_cpp")  # before gguf's imports: dflash_local.train.cli says why
        with open(a.tokenize_to, "wb") as f:
            pickle.dump(tokenize(a), f)
        return
    if a.output is None or (a.steps is None) == (a.deadline is None):
        ap.error("give -o, and --steps or --deadline")
    from dflash_local.train.data import Dataset

    console = Console()
    layers = capture_layers(a)
    ds = Dataset(a.data_dir, a.target, layers, info(a).n_embd)
    if a.todo:
        todo, skipped, eog = pickle.loads(a.todo.read_bytes())
        done = ds.keys()  # the file may be older than the data set
        todo = [t for t in todo if t[0] not in done][:a.max_answers]
        console.print(f"{len(todo)} prompts to answer ({skipped} too long)", highlight=False)
    import torch
    from torch_target import TorchTarget

    dev = torch.device(a.device)
    # TF32 errs far less than the features' float8 storage, and than llama.cpp's own answers do (8-bit activations
    # in its quantized matmuls: logits 2e-2 off the exact ones for SmolLM2, bench/train/README.md); float32 took a
    # wide target's answers to the GPU's slower arithmetic
    torch.backends.cuda.matmul.allow_tf32 = True
    tt = TorchTarget(a.target, dev)
    if a.todo:
        answer(tt, todo, ds, a, eog)
    t0 = time.perf_counter()
    codes, scales = features(tt, ds, layers)
    del tt
    torch.cuda.empty_cache()
    console.print(f"features of {len(ds.sequences)} sequences, {ds.n_rows} positions ({codes.numel() / 1e9:.1f} GB "
                  f"float8) in {time.perf_counter() - t0:.0f} s", highlight=False)
    train(a, ds, layers, (codes, scales), console)


def info(a: argparse.Namespace) -> TargetInfo:
    """The target's shape (gguf is imported here: in the llama.cpp process, after llama.cpp)."""
    from dflash_local.convert.gguf_target import read_target

    return read_target(a.target)


def capture_layers(a: argparse.Namespace) -> tuple[int, ...]:
    from dflash_local.train.target_layers import parse_target_layers

    return parse_target_layers(a.target_layers, info(a).n_layer)


def tokenize(a: argparse.Namespace) -> tuple[list[Todo], int, list[int]]:
    """The prompts not yet answered in a.data_dir, tokenized, as answers.plan gives them (key, group, tokens), how
    many are too long, and the target's end-of-generation tokens."""
    from dflash_local.target import Target, TargetParams
    from dflash_local.train import answers
    from dflash_local.train.data import Dataset
    from dflash_local.train.prompts import training_prompts

    tg = Target(a.target, TargetParams(n_ctx=answers.context_size(info(a).n_ctx, a.max_new_tokens)))
    try:
        ds = Dataset(a.data_dir, a.target, capture_layers(a), info(a).n_embd)
        todo, skipped = answers.plan(tg, training_prompts(a.prompts), ds, a.max_new_tokens)
        random.Random(a.seed).shuffle(todo)  # sources mixed: a run cut short has answered some of each
        # plain tuples: reading them needs no llama.cpp (whose CPU build crashed on the lent H100, above)
        return [(t.key, t.group, t.prompt) for t in todo], skipped, [t for t in range(tg.n_vocab) if tg.is_eog(t)]
    finally:
        tg.close()


def answer(tt: TorchTarget, todo: list[Todo], ds: Dataset, a: argparse.Namespace, eog: list[int]) -> None:
    """The target's greedy answers to todo, in order, up to a.answer_batch prompts and ANSWER_TOKENS of KV cache at a
    time (sorted by length within runs of 4 batches: less padding), each stored at once; until a.answer_seconds."""
    t0, n_tokens = time.perf_counter(), 0
    with Progress() as progress:
        task = progress.add_task("torch target answers", total=len(todo))
        for i in range(0, len(todo), 4 * a.answer_batch):
            run = sorted(todo[i:i + 4 * a.answer_batch], key=lambda t: len(t[2]))
            while run and not (a.answer_seconds and time.perf_counter() - t0 > a.answer_seconds):
                n = 1
                while n < min(len(run), a.answer_batch) and \
                        (n + 1) * (len(run[n][2]) + a.max_new_tokens) <= ANSWER_TOKENS:
                    n += 1
                batch, run = run[:n], run[n:]
                for (key, group, prompt), ans in zip(batch, tt.answer([t[2] for t in batch], a.max_new_tokens, eog)):
                    ds.append(key, group, prompt + ans, len(prompt))
                    n_tokens += len(ans)
                progress.update(task, advance=len(batch), description=f"torch target answers ({n_tokens} tokens, "
                                f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s)")
    ds.save()


def features(tt: TorchTarget, ds: Dataset, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of every row of ds, on the GPU: sequences sorted by length into batches of about
    FEATURE_TOKENS padded tokens."""
    import torch

    tokens, starts = ds.token_arrays()
    lengths = np.array([s.n_tokens for s in ds.sequences])
    codes = torch.empty(len(tokens), ds.width, dtype=torch.uint8, device=tt.device)
    scales = torch.empty(len(tokens), ds.n_extract, device=tt.device)
    order = np.argsort(-lengths, kind="stable")
    with Progress() as progress:
        task = progress.add_task("torch target features", total=len(order))
        i = 0
        while i < len(order):
            n = max(1, FEATURE_TOKENS // int(lengths[order[i]]))
            batch = order[i:i + n]
            c, s = tt.features([tokens[starts[k]:starts[k] + lengths[k]] for k in batch], layers)
            rows = torch.from_numpy(np.concatenate([np.arange(starts[k], starts[k] + lengths[k]) for k in batch]))
            rows = rows.to(tt.device)
            codes[rows], scales[rows] = c, s
            i += len(batch)
            progress.update(task, advance=len(batch))
    return codes, scales


def timed_steps(tr: Trainer, n: int) -> float:
    """Seconds of n training steps, waiting for the GPU at the end."""
    t0 = time.perf_counter()
    for _ in range(n):
        loss, _ = tr.step(tr.sample())
    loss.item()
    return time.perf_counter() - t0


def train(a: argparse.Namespace, ds: Dataset, layers: tuple[int, ...], feats: tuple[torch.Tensor, torch.Tensor],
          console: Console) -> None:
    """Training from a.init or random weights, for a.steps or until a.deadline, then the export of the weights of the
    best held-out tau."""
    import torch

    from dflash_local.convert.gguf_io import save_drafter_gguf
    from dflash_local.train import trainer
    from dflash_local.train.cli import initial_drafter

    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    drafter = initial_drafter(a.target, a.init, a.layers, layers, a.block_size, a.ffn).to(dev)
    opts = trainer.TrainOptions(steps=a.steps or 100_000, batch=a.batch, anchors=a.anchors, lr=a.lr, seed=a.seed,
                                checkpoint_every=a.checkpoint_every)
    tr = trainer.Trainer(drafter, ds, opts, dev, features=feats)
    console.print(f"training: {len(tr.seqs)} sequences ({len(tr.held_out)} held out), {ds.anchor_positions} answer "
                  "positions", highlight=False)
    checkpoint = a.output.with_suffix(".ckpt")
    given = a.init is not None  # the given weights are a candidate for the export too
    with Progress(console=console) as progress:
        if a.deadline:  # the rate of PROBE_STEPS steps sets the schedule's first length; Trainer.run corrects it
            if given:  # before the probe's steps: Trainer.run checks them at step 0 only
                tr.checkpoint_given(checkpoint, console)
                given = False
            timed_steps(tr, PROBE_STEPS // 3)  # the first steps are slower (H100: 7.2 steps/s over all 300, 14.0 after)
            rate = (PROBE_STEPS - PROBE_STEPS // 3) / timed_steps(tr, PROBE_STEPS - PROBE_STEPS // 3)
            opts.steps = PROBE_STEPS + max(0, int(0.97 * rate * (a.deadline - time.time())))  # past: no more
            console.print(f"{rate:.1f} steps/s: {opts.steps} steps", highlight=False)
        fit = tr.run(checkpoint, progress, given_weights=given, deadline=a.deadline)
    console.print(f"{fit.steps} steps in {fit.seconds:.0f} s ({fit.steps / fit.seconds:.1f} steps/s), loss "
                  f"{fit.loss:.3f}; exported step {fit.best_step}, held-out tau {fit.held_out_tau:.2f}",
                  highlight=False)
    tr.use_best()
    save_drafter_gguf(drafter, a.output, a.target, a.outtype, name=f"{a.target.stem} DFlash drafter")


if __name__ == "__main__":
    main()
