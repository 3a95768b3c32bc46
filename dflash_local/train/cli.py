"""`dflash train`: data from the target, training in torch, export to GGUF, evaluation of tau.

Only typer is imported at module level: `dflash --help` must not pay for torch. The process that runs llama.cpp never
imports torch: training and export run in a child process (`_fit`). On CUDA machines llama.cpp's CUDA backend links the
system's libnccl and torch its own copy; both in one process crash (seen on an H100 with torch 2.11+cu130).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer

if TYPE_CHECKING:
    from rich.progress import Progress

    from dflash_local.reference import Drafter

DEFAULT_EPOCHS = 3.0  # of 1, 3, 5 and 9.5 epochs, 3 drafted best for SmolLM2 on held-out prompts (bench/train)


def train(
    target: str = typer.Argument(..., help="Target GGUF the drafter is for, or a built-in model's name."),
    output: Path = typer.Option(..., "--output", "-o", help="Drafter GGUF to write."),
    prompts: list[str] = typer.Option(["builtin"], "--prompts", help="'builtin', 'stdlib' (function stubs of this "
                                      "Python's standard library, raw, alone and in chat requests), a folder of "
                                      "Python code (the same from its files), or a .jsonl ({\"prompt\": ...} lines) "
                                      "or .txt (one per line) file; repeat to combine."),
    max_prompts: int = typer.Option(None, "--max-prompts", min=1, help="Use only the first N prompts."),
    self_prompts: int = typer.Option(0, "--self-prompts", min=0, help="Also N chat requests the target writes "
                                     "itself (sampled, under its chat template) and then answers: varied data in its "
                                     "own words, with no prompt set."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=2, help="Longest answer the target writes."),
    parallel: int = typer.Option(8, "--parallel", min=1, max=256, help="Prompts the target answers at once, in one "
                                 "batch (llama.cpp allows 256; a GPU takes many nearly as fast as a few)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Dataset folder (default: <output>-data next to the "
                                  "output); an interrupted run resumes there."),
    layers: int = typer.Option(2, "--layers", min=1, max=8, help="Drafter decoder layers."),
    ffn: int = typer.Option(None, "--ffn", min=1, help="Drafter FFN width (default: --init's, else the target's "
                            "feed_forward_length; narrower keeps a drafter for a wide target small)."),
    block_size: int = typer.Option(16, "--block-size", min=2, max=64),
    target_layers: str = typer.Option("auto", "--target-layers", help="Target layers whose hidden states the "
                                      "drafter reads: 'auto' or GGUF ids (HF id + 1), e.g. 2,8,15,22,28."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: from --epochs)."),
    epochs: float = typer.Option(None, "--epochs", min=0.01,
                                 help=f"Passes over the answer positions (default {DEFAULT_EPOCHS:g})."),
    batch: int = typer.Option(4, "--batch", min=1, help="Sequences per step."),
    anchors: int = typer.Option(16, "--anchors", min=1, help="Blocks per sequence per step."),
    lr: float = typer.Option(6e-4, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    resume: bool = typer.Option(False, "--resume", help="Continue training from <output>.ckpt."),
    init: Path = typer.Option(None, "--init", help="Start from this drafter GGUF's weights (e.g. the shipped one, to "
                              "train it further or on other data) instead of random ones; it must have the "
                              "--target-layers and --block-size asked for, and at most --layers layers (more are "
                              "added as identities)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for training: cpu or cuda."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", help="Target layers llama.cpp offloads to the GPU."),
    threads: int = typer.Option(0, "--threads", "-t", min=0, help="CPU threads (0: the cores this process may use)."),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16, bf16 or q8_0."),
    eval_source: str = typer.Option("chat", "--eval", help="Held-out prompts for tau, as `dflash bench --prompts`: "
                                    "humaneval, chat, a .jsonl/.txt file; or none."),
    eval_prompts: int = typer.Option(16, "--eval-prompts", min=1, help="Evaluate on the first N of them."),
    data_only: bool = typer.Option(False, "--data-only", help="Stop after the data phase (answers and their "
                                   "features): e.g. to fill the data set over several runs cut short, then train."),
) -> None:
    """Train a DFlash drafter for TARGET on the target's own answers, write it as GGUF, and measure tau."""
    args = dict(locals())
    # llama.cpp's libraries load before gguf's imports: sentencepiece (or tokenizers) loaded first made the first
    # llama_model_load_from_file segfault (seen on the lent H100 machines, which have both installed)
    importlib.import_module("llama_cpp")
    from dflash_local import models
    from dflash_local.console import command_errors

    with command_errors():
        args["target"] = models.resolve_target(target)
        _train(**args)


def _train(target: Path, output: Path, prompts: list[str], max_prompts: int | None, self_prompts: int,
           max_new_tokens: int, parallel: int, data_dir: Path | None, layers: int, ffn: int | None, block_size: int,
           target_layers: str,
           steps: int | None, epochs: float | None, batch: int, anchors: int, lr: float, seed: int,
           checkpoint_every: int, resume: bool, init: Path | None, device: str, n_gpu_layers: int, threads: int,
           outtype: str, eval_source: str, eval_prompts: int, data_only: bool) -> None:
    import dataclasses

    from rich.table import Table

    from dflash_local import native
    from dflash_local.bench.prompts import load_prompts
    from dflash_local.console import console
    from dflash_local.convert.gguf_target import OUTTYPES, read_target
    from dflash_local.errors import UsageError, UserError
    from dflash_local.target import Target, TargetParams
    from dflash_local.train import answers, data, evaluate
    from dflash_local.train.prompts import training_prompts
    from dflash_local.train.target_layers import parse_target_layers

    # every input is checked before the hours of work start
    if steps is not None and epochs is not None:
        raise UsageError("give either --steps or --epochs, not both")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not _in_child(_cuda_available):
        raise UserError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")
    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    info = read_target(target)
    capture = parse_target_layers(target_layers, info.n_layer)
    if init is not None:
        _in_child(_check_init, target, init, layers, capture, block_size, ffn)
    train_prompts = training_prompts(prompts, max_prompts)
    held_out = [] if eval_source == "none" else load_prompts(eval_source, eval_prompts)
    data_dir = data_dir or output.parent / f"{output.stem}-data"
    params = TargetParams(n_ctx=answers.context_size(info.n_ctx, max_new_tokens), n_gpu_layers=n_gpu_layers,
                          n_threads=threads)

    # 1. the target answers the prompts; then a second context captures the hidden states of prompt + answer
    tg = Target(target, dataclasses.replace(params, n_seq=parallel))
    try:
        ds = data.Dataset(data_dir, target, capture, info.n_embd)
        legacy = data_dir / data.LEGACY_FEATURES
        if legacy.is_file():
            console.print(f"note: {legacy} holds float16 features of an earlier version, no longer read: they are "
                          f"captured again in float8 (delete it to free {_size(legacy.stat().st_size)})", highlight=False)
        todo, skipped = answers.plan(tg, train_prompts, ds, max_new_tokens)
        n_requests = answers.requests_missing(ds, self_prompts)
        need = answers.max_rows(tg, todo, n_requests, max_new_tokens) * ds.row_bytes
        console.print(f"data: {len(todo) + n_requests} prompts to answer"
                      + (f", {n_requests} of them requests the target writes first" if n_requests else "")
                      + f" ({len(ds.sequences)} done, {skipped} too long), "
                      f"up to {_size(need)} more in {data_dir} (layers {list(capture)}, "
                      f"{ds.width} features per token)", highlight=False)
        with _bar() as progress:
            if n_requests:
                todo = answers.spread(todo, answers.write_requests(tg, n_requests, ds, max_new_tokens, progress, seed))
            gen = answers.answer(tg, todo, ds, max_new_tokens, progress)
    finally:
        tg.close()
    tg = Target(target, answers.capture_params(params), capture_layers=capture)
    try:
        with _bar() as progress:
            cap = answers.capture(tg, ds, progress)
    finally:
        tg.close()

    table = Table(title=f"dflash train: {output}")
    for col in ("phase", "amount", "time", "rate"):
        table.add_column(col)
    table.add_row("answers", f"{gen.sequences} answers, {gen.tokens} tokens (total {len(ds.sequences)} sequences)",
                  *_timing(gen.tokens, gen.seconds, "tok/s"))
    table.add_row("capture", f"{cap.sequences} sequences, {cap.tokens} positions (total "
                  f"{_size(ds.n_rows * ds.row_bytes)})", *_timing(cap.tokens, cap.seconds, "tok/s"))
    if data_only:
        console.print(table)
        return

    # 2. training, 3. export
    steps = steps or max(1, round((epochs or DEFAULT_EPOCHS) * ds.anchor_positions / (batch * anchors)))
    fit, step_no = _in_child(_fit, target, output, data_dir, capture, info.n_embd, layers, ffn, block_size, steps,
                             batch, anchors, lr, seed, checkpoint_every, resume, init, device, threads, outtype)

    # 4. evaluation
    ev = None
    if held_out:
        # the drafter runs where training ran when llama.cpp was built for that GPU too
        dr_device = "CUDA0" if device == "cuda" and "CUDA0" in native.devices() else None
        with _bar() as progress:
            ev = evaluate.measure_tau(target, output, held_out, max_new_tokens, params, dr_device, progress)

    trained = (f"{fit['steps']} steps (to step {step_no}), loss {fit['loss']:.3f}, tau~{fit['tau']:.2f}"
               if fit["steps"] else f"none: the checkpoint is at step {step_no}, --steps {steps}")
    if not math.isnan(fit["held_out_tau"]):  # held-out answers picked the weights
        trained += f"; exported: step {fit['best_step']}, held-out tau {fit['held_out_tau']:.2f}"
    table.add_row("training", trained, *_timing(fit["steps"], fit["seconds"], "steps/s"))
    if ev:
        table.add_row(f"eval ({eval_source})", f"{ev.prompts} prompts, tau {ev.tau:.2f}", f"{ev.seconds:.0f} s",
                      f"{ev.tokens_per_second:.1f} tok/s")
    console.print(table)


def _in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh process (spawned, not forked: no llama.cpp in it) that may import torch; its exceptions
    (UserError...) re-raise here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _fit(target: Path, output: Path, data_dir: Path, capture: tuple[int, ...], n_embd: int, layers: int,
         ffn: int | None, block_size: int, steps: int, batch: int, anchors: int, lr: float, seed: int,
         checkpoint_every: int, resume: bool, init: Path | None, device: str, threads: int,
         outtype: str) -> tuple[dict[str, float], int]:
    """Training and export, in the child process: the TrainReport as a dict (unpickling the class would import
    torch in the parent) and the step reached."""
    import dataclasses

    import torch

    from dflash_local.console import console
    from dflash_local.convert.gguf_io import save_drafter_gguf
    from dflash_local.train import data, trainer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    ds = data.Dataset(data_dir, target, capture, n_embd)
    drafter = initial_drafter(target, init, layers, capture, block_size, ffn).to(dev)
    opts = trainer.TrainOptions(steps=steps, batch=batch, anchors=anchors, lr=lr, seed=seed,
                                checkpoint_every=checkpoint_every)
    tr = trainer.Trainer(drafter, ds, opts, dev)
    checkpoint = output.with_suffix(".ckpt")
    if resume and checkpoint.is_file():
        tr.load(checkpoint)
        console.print(f"resuming from step {tr.step_no} of {opts.steps} ({checkpoint})", highlight=False)
    elif resume:
        console.print(f"[yellow]note:[/yellow] no checkpoint at {checkpoint}: training from the start", highlight=False)
    n_params = sum(p.numel() for p in drafter.parameters())
    start = f", from {init}" if init else ""
    console.print(f"training: {layers}-layer drafter ({n_params / 1e6:.1f} M parameters{start}), {opts.steps} steps "
                  f"of {batch} x {anchors} blocks of {block_size} on {device}; {ds.anchor_positions} answer positions "
                  f"in {len(tr.seqs) + len(tr.held_out)} sequences, {len(tr.held_out)} of them held out to pick the "
                  "exported weights",
                  highlight=False)
    with _bar() as progress:
        fit = tr.run(checkpoint, progress, given_weights=init is not None)
    tr.use_best()
    save_drafter_gguf(drafter, output, target, outtype, name=f"{target.stem} DFlash drafter")
    return dataclasses.asdict(fit), tr.step_no


def initial_drafter(target: Path, init: Path | None, layers: int, capture: tuple[int, ...], block_size: int,
                    ffn: int | None = None) -> Drafter:
    """The drafter training starts from: random weights of the shape asked for (FFN width ffn, default the
    target's), or init's (ffn default: init's). More layers than init's are appended after its own, each the identity
    at first (its attention and FFN output projections zero), so that training starts from init's drafts with more
    capacity."""
    import dataclasses

    import torch

    from dflash_local.convert.gguf_io import load_drafter_gguf, target_embeddings
    from dflash_local.errors import UsageError, UserError
    from dflash_local.reference import Drafter
    from dflash_local.train import trainer

    if init is None:
        return Drafter(trainer.drafter_config(target, layers, capture, block_size, ffn), *target_embeddings(target))
    if not init.is_file():
        raise UserError(f"--init: drafter not found: {init}")
    drafter = load_drafter_gguf(init, target)
    cfg = trainer.drafter_config(target, layers, capture, block_size, ffn or drafter.cfg.n_ff)
    have, want = dataclasses.asdict(drafter.cfg), dataclasses.asdict(cfg)
    if diff := [f"{k} {have[k]} (this run: {want[k]})" for k in want if have[k] != want[k] and k != "n_layer"]:
        raise UsageError(f"--init {init} is another shape of drafter: {', '.join(diff)}; give the same "
                        "--target-layers, --block-size and --ffn")
    if layers < drafter.cfg.n_layer:
        raise UsageError(f"--init {init} has {drafter.cfg.n_layer} layers: give --layers {drafter.cfg.n_layer} or more")
    if layers == drafter.cfg.n_layer:
        return drafter
    grown = Drafter(cfg, drafter.tok_embd, drafter.lm_head)
    grown.load_state_dict(drafter.state_dict(), strict=False)  # the new layers keep their random weights
    with torch.no_grad():
        for layer in grown.layers[drafter.cfg.n_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown


def _check_init(target: Path, init: Path, layers: int, capture: tuple[int, ...], block_size: int,
                ffn: int | None) -> None:
    """initial_drafter's checks, before the data phase: a Drafter itself would bring torch into the parent."""
    initial_drafter(target, init, layers, capture, block_size, ffn)


def _bar() -> Progress:
    from rich.progress import Progress, TimeElapsedColumn

    from dflash_local.console import console

    return Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console)


def _timing(amount: float, seconds: float, unit: str) -> tuple[str, str]:
    """Time and rate columns of a phase."""
    return f"{seconds:.0f} s", f"{amount / seconds:.1f} {unit}" if amount and seconds else "-"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"
