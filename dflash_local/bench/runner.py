"""The benchmark loop: target-only and DFlash at each block size on the same prompts, in one process,
interleaved per prompt after a warm-up, checking on the way that greedy outputs are identical.

Both modes share the target's weights, but the target alone runs in a llama.cpp context of its own, as
`dflash run --no-draft` does: no capture callback, no shared KV buffer for trees (on a CPU a one-token pass in a
62-sequence buffer cost ~10 % more), no recurrent-state snapshots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dflash_local.bench.divergence import Divergence, classify
from dflash_local.bench.emulate import EmulatedDrafter, Profile
from dflash_local.bench.machine import gpu_used_mb, peak_rss_mb, rss_mb
from dflash_local.bench.prompts import Prompt
from dflash_local.engine import Engine, Generation, Stats, generate_in_job
from dflash_local.loader import open_drafter, open_target
from dflash_local.target import Target, TargetParams
from dflash_local.tree import TREE_SIZE

WARMUP_TOKENS = 16


@dataclass
class BenchConfig:
    target: Path
    drafter: Path
    prompts: list[Prompt]
    max_tokens: int
    block_sizes: list[int]
    params: TargetParams
    device: str | None = None  # the drafter's ggml device
    adaptive: bool = True  # draft length chosen per step (as `dflash run` does), else the whole block
    tree_size: int = TREE_SIZE  # the most drafts of a tree (0: a chain)
    emulate: Profile | None = None  # emulated acceptance (bench/emulate.py): chains only


@dataclass
class Totals:
    """One mode (target-only, DFlash or upstream at one block size) summed over the prompts."""

    mode: str  # "target", "dflash" or "llama.cpp"
    block_size: int | None = None
    emulated: bool = False  # DFlash with emulated acceptance (bench/emulate.py)
    prompts: int = 0
    prompt_tokens: int = 0
    generated: int = 0
    passes: int = 0  # target forward passes after the prefill
    accepted: int = 0  # draft tokens accepted, summed over passes
    # passes that verified drafts, by number of drafts accepted (0 .. block_size-1)
    hist: list[int] = field(default_factory=list)
    t_prefill: float = 0.0
    t_decode: float = 0.0
    t_target: float = 0.0
    t_draft: float = 0.0
    t_inject: float = 0.0
    t_capture: float = 0.0
    error: str | None = None

    @property
    def key(self) -> str:
        key = self.mode if self.block_size is None else f"{self.mode}-{self.block_size}"
        return f"{key} (emulated acceptance)" if self.emulated else key

    def add(self, s: Stats, stop: str) -> None:
        self.prompts += 1
        self.prompt_tokens += s.prompt_tokens
        self.generated += s.generated
        if self.mode == "dflash":
            self.passes += s.passes
            self.accepted += sum(s.accepted)
            if not self.hist:
                self.hist = [0] * self.block_size
            for n, k in zip(s.accepted, s.drafted):
                if k:  # passes that verified drafts: the acceptance of the drafter, not of the draft-length choice
                    self.hist[n] += 1
        else:  # one pass per token after the first (which the prefill gives); an end token costs one too
            self.passes += max(s.generated - 1 + (stop == "eog"), 0)
        for name in ("t_prefill", "t_decode", "t_target", "t_draft", "t_inject", "t_capture"):
            setattr(self, name, getattr(self, name) + getattr(s, name))

    @property
    def decode_tps(self) -> float:
        return self.generated / self.t_decode if self.t_decode > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.t_prefill if self.t_prefill > 0 else 0.0

    @property
    def tau(self) -> float | None:
        """Tokens gained per target pass (accepted drafts + the target's own token)."""
        return 1.0 + self.accepted / self.passes if self.mode != "target" and self.passes else None

    def shares(self) -> dict[str, float]:
        """Fractions of decode time; capture runs inside the target's passes and is part of `target`."""
        if self.mode == "llama.cpp" or self.t_decode <= 0:  # upstream reports no breakdown
            return {}
        parts = {"target": self.t_target, "draft": self.t_draft, "inject": self.t_inject}
        out = {k: v / self.t_decode for k, v in parts.items()}
        out["other"] = max(0.0, 1.0 - sum(out.values()))
        out["capture"] = self.t_capture / self.t_decode
        return out


@dataclass
class Mismatch:
    prompt_id: str
    block_size: int
    index: int  # first generated token that differs
    expected: list[int]  # a few tokens from `index` on
    got: list[int]
    divergence: Divergence | None = None  # rounding or not, once classified


@dataclass
class PromptRecord:
    id: str
    text: str  # exactly what was tokenized (chat template applied)
    prompt_tokens: int
    target_text: str  # the target's own greedy continuation
    runs: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


@dataclass
class BenchResult:
    totals: dict[str, Totals]
    prompts: list[PromptRecord]
    mismatches: list[Mismatch]
    memory: dict[str, float | None]
    notes: list[str]
    drafter: dict[str, object]  # the drafter's shape as the helper read it
    n_threads: int  # the target context's CPU threads
    emulation_seconds: float = 0.0  # settling emulated drafts by trial passes, off the decode time

    @property
    def failures(self) -> list[Mismatch]:
        """Divergences not shown to be rounding (bench/divergence.py)."""
        return [m for m in self.mismatches if not (m.divergence and m.divergence.rounding)]


def find_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first token where `got` leaves `expected`, or None when they are identical."""
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return i
    return None if len(expected) == len(got) else min(len(expected), len(got))


def check(prompt_id: str, block_size: int, expected: list[int], got: list[int]) -> Mismatch | None:
    i = find_mismatch(expected, got)
    return None if i is None else Mismatch(prompt_id, block_size, i, expected[i:i + 8], got[i:i + 8])


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def run_bench(cfg: BenchConfig, console: Console,
              on_mismatch: Callable[[Mismatch], None] | None = None) -> BenchResult:
    mem0, gpu0 = rss_mb(), gpu_used_mb()
    # the drafter first, so that its own memory can be read off (open_models loads both at once)
    drafter = open_drafter(cfg.drafter, cfg.target, cfg.params, cfg.device)
    mem1, gpu1 = rss_mb(), gpu_used_mb()
    tree_size = 0 if cfg.emulate else cfg.tree_size
    tg = open_target(cfg.target, cfg.params, drafter, tree_size)
    base_tg = Target(cfg.target, cfg.params, model_of=tg)
    emu = EmulatedDrafter(drafter, cfg.emulate, tg) if cfg.emulate else None
    try:
        baseline = Engine(base_tg)
        # an emulated acceptance is the profile's: no copies beside its drafts
        engines = {b: Engine(tg, emu or drafter, b, cfg.adaptive, tree_size, copies=emu is None)
                   for b in cfg.block_sizes}
        totals = {"target": Totals("target")} | {f"dflash-{b}": Totals("dflash", b, emu is not None)
                                                 for b in cfg.block_sizes}
        notes: list[str] = []
        if emu:
            notes.append(f"emulated acceptance {cfg.emulate.name} (tau {cfg.emulate.tau:.2f}): the drafter ran every "
                         "pass, its drafts were replaced by the target's own picks as its verification makes them, "
                         "cut at a length drawn from the profile (bench/emulate.py); chains only")
        texts = [_prompt_text(tg, p, notes) for p in cfg.prompts]
        tokens = [tg.tokenize(text) for text in texts]
        records = [PromptRecord(p.id, text, len(toks), "") for p, text, toks in zip(cfg.prompts, texts, tokens)]
        mismatches: list[Mismatch] = []
        n_threads = llama_cpp.llama_n_threads(tg.ctx)
        gpu_peak = gpu_used_mb()

        with progress_bar(console) as progress:
            task = progress.add_task("warm-up", total=len(records) * (1 + len(engines)))
            warm = generate_in_job(baseline, tokens[0], WARMUP_TOKENS)
            for eng in engines.values():
                _dflash(eng, tokens[0], WARMUP_TOKENS, warm, emu)
            emu_warm = emu.seconds if emu else 0.0
            for rec, toks in zip(records, tokens):
                progress.update(task, description=rec.id)
                ref = generate_in_job(baseline, toks, cfg.max_tokens)
                totals["target"].add(ref.stats, ref.stop)
                rec.target_text = tg.text(ref.tokens)
                rec.runs["target"] = {"generated": ref.stats.generated, "decode_tps": ref.stats.decode_tps}
                progress.advance(task)
                for b, eng in engines.items():
                    gen = _dflash(eng, toks, cfg.max_tokens, ref, emu)
                    run = totals[f"dflash-{b}"]
                    run.add(gen.stats, gen.stop)
                    rec.runs[run.key] = {"generated": gen.stats.generated, "decode_tps": gen.stats.decode_tps,
                                         "tau": gen.stats.tau}
                    if (mm := check(rec.id, b, ref.tokens, gen.tokens)) is not None:
                        mm.divergence = classify(base_tg, toks, ref.tokens, gen.tokens, mm.index, b)
                        mismatches.append(mm)
                        if on_mismatch:
                            on_mismatch(mm)
                    progress.advance(task)
                gpu_now = gpu_used_mb()
                gpu_peak = max(gpu_peak, gpu_now) if gpu_now is not None and gpu_peak is not None else None
            emulation_seconds = emu.seconds - emu_warm if emu else 0.0
    finally:
        base_tg.close()  # before tg, whose model it uses
        tg.close()
        drafter.close()
    memory = {
        "peak_rss_mb": peak_rss_mb(),
        "drafter_rss_mb": mem1 - mem0,
        "gpu_used_mb": None if gpu_peak is None or gpu0 is None else gpu_peak - gpu0,
        "drafter_gpu_mb": None if gpu1 is None or gpu0 is None else gpu1 - gpu0,
    }
    info = {"block_size": drafter.info.block_size, "n_layer": drafter.info.n_layer,
            "target_layers": list(drafter.info.target_layers), "capture": tg.capture_method}
    return BenchResult(totals, records, mismatches, memory, notes, info, n_threads, emulation_seconds)


def _dflash(engine: Engine, tokens: list[int], n: int, ref: Generation, emu: EmulatedDrafter | None) -> Generation:
    """DFlash on a prompt; emulated, its drafts follow ref (the target alone's run of it) and the verification's
    own picks, and the time spent planning them is taken off its decode time."""
    if emu is None:
        return generate_in_job(engine, tokens, n)
    emu.start(tokens, ref.tokens, engine.block_size, n)
    t0 = emu.seconds
    try:
        gen = generate_in_job(engine, tokens, n, emu.on_tokens)
    finally:
        emu.stop()
    gen.stats.t_decode -= emu.seconds - t0
    return gen


NO_TEMPLATE = "the target has no chat template: chat prompts ran as raw completion"


def _prompt_text(tg: Target, p: Prompt, notes: list[str]) -> str:
    text = tg.chat_prompt([("user", p.text)]) if p.chat else p.text
    if text is None:
        text = p.text
        if NO_TEMPLATE not in notes:
            notes.append(NO_TEMPLATE)
    return text
