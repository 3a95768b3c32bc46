"""Training a drafter on a Dataset, per the paper's recipe (docs/design.md, section 9).

Each step takes a few sequences and, in each, random anchor positions in the answer: block
[token at anchor, MASK...], labels = the next B-1 tokens, context = target features of the positions before
the anchor. All blocks of a step share one forward pass, the sequences side by side and padded to the longest
(reference.Drafter.hidden_seqs), so that a GPU runs a few large kernels rather than many small ones. The target's
embedding and LM head stay frozen (buffers, not parameters).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor

from dflash_local.convert.gguf_target import read_gguf, read_target
from dflash_local.errors import UserError
from dflash_local.reference import Drafter, DrafterConfig
from dflash_local.train.data import Dataset, Sequence

IGNORE = -100  # label of block positions past the end of the answer
# Every HOLD_OUT-th group of sequences (Sequence.group) is held out of training: at each checkpoint, the tau of
# decoding WALK_SEQS of them picks the weights that are exported, since past a few epochs a small data set is learned by
# heart (bench/HISTORY.md: training tau~ 12.5 and HumanEval tau 1.47 at 9.5 epochs, 6.3 and 2.15 at 3).
HOLD_OUT = 50
WALK_SEQS = 32
# answer tokens each of them is decoded for: as `bench/train/tau.py` and the HumanEval goal (first 128 tokens). Blocks
# anchored at random answer positions would flatter the drafter: a run of easy tokens (a loop, a copied line) is
# crossed in one pass when decoding but is most of the random anchors (held-out tau~ 6.32 by those, tau 2.67 on
# HumanEval; bench/HISTORY.md)
WALK_TOKENS = 128
# steps between readings of the moving averages for the progress bar: each reading waits for the GPU
SHOW_EVERY = 25
# a step's context length (its last anchor) is rounded up to a multiple of this, so that a GPU's fused attention sees
# a few dozen shapes rather than one per length (it plans each new shape). With exact lengths, the twelfth session's
# rate probe read 9.3 steps/s over steps 100-300 and the run then averaged 20.0 (an H200; the cause not measured apart)
CONTEXT_MULTIPLE = 64
E4M3_MAX = 448.0  # float8 e4m3's largest finite value


def trainable(s: Sequence) -> bool:
    """An answer of 2 tokens or more: at least one anchor that has a label."""
    return s.n_tokens - s.n_prompt >= 2


def held_out_groups(sequences: list[Sequence]) -> set[str]:
    """Every HOLD_OUT-th group of the trainable sequences, in order of first appearance: whole groups, so that a
    held-out answer has no near-copy in training."""
    groups = list(dict.fromkeys(s.group for s in sequences if trainable(s)))
    return set(groups[HOLD_OUT - 1::HOLD_OUT])


def mask_token(target_gguf: Path) -> int:
    """The target's own mask token, else its unknown token, else the last vocabulary id: tokens the target does
    not produce in answers, so the mask never looks like an anchor."""
    fields = read_gguf(target_gguf).fields
    for key in ("tokenizer.ggml.mask_token_id", "tokenizer.ggml.unknown_token_id"):
        if key in fields:
            return int(fields[key].contents())
    return read_target(target_gguf).n_vocab - 1


def drafter_config(target_gguf: Path, n_layer: int, target_layers: tuple[int, ...], block_size: int,
                   n_ff: int | None = None) -> DrafterConfig:
    """The target's hidden size, head layout, FFN width (unless n_ff is given), norm epsilon and RoPE base (docs/design.md,
    section 2). A narrower FFN keeps a drafter for a wide target small: one layer of Qwen2.5-Coder-1.5B's 8,960 takes
    some 50 MB in q8_0."""
    t = read_target(target_gguf)
    fields = read_gguf(target_gguf).fields

    def get(key: str, default: float) -> float:
        f = fields.get(f"{t.arch}.{key}")
        v = default if f is None else f.contents()
        return max(v) if isinstance(v, list) else v  # per-layer arrays: the widest layer

    return DrafterConfig(
        n_embd=t.n_embd, n_layer=n_layer, n_head=t.n_head, n_head_kv=t.n_head_kv, head_dim=t.head_dim,
        n_ff=n_ff or int(get("feed_forward_length", 4 * t.n_embd)), n_vocab=t.n_vocab,
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), rope_base=float(get("rope.freq_base", 10000.0)),
        target_layers=target_layers, mask_token_id=mask_token(target_gguf), block_size=block_size)


def position_weights(block_size: int) -> Tensor:
    """Loss weight of block offsets 1..B-1: exp(-(k-1)/gamma), gamma 7 at B=16 (the paper's) scaled with B. An
    early miss ends the accepted prefix, so early positions matter most."""
    gamma = 7.0 * block_size / 16
    return torch.exp(-torch.arange(block_size - 1, dtype=torch.float32) / gamma)


@dataclass(frozen=True)
class Blocks:
    """The training blocks of one step: S sequences, up to N blocks each, padded at the end."""

    features: Tensor  # [S, T, width] float32: each sequence's positions before its last anchor
    anchors: Tensor  # [S, N] (padding: 0)
    tokens: Tensor  # [S, N, B]: the anchor token, then masks
    labels: Tensor  # [S, N, B-1]: the tokens that follow, IGNORE past the end and in padding blocks


@dataclass
class TrainOptions:
    steps: int
    batch: int = 4  # sequences per step
    anchors: int = 16  # blocks per sequence
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup: float = 0.04  # share of the steps
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200


@dataclass
class TrainReport:
    steps: int = 0  # run now (not counting resumed ones)
    seconds: float = 0.0
    loss: float = float("nan")  # moving averages at the end
    tau: float = float("nan")
    held_out_tau: float = float("nan")  # best tau of decoding held-out answers (held_out_tau), and its step
    best_step: int = 0


class Trainer:
    def __init__(self, drafter: Drafter, ds: Dataset, opts: TrainOptions, device: torch.device,
                 features: tuple[Tensor, Tensor] | None = None):
        """features: the codes and scales of ds's rows, as Dataset.arrays gives them, when they come from elsewhere
        than ds's files (bench/train/gpu_train.py computes them with the target in torch)."""
        self.drafter, self.opts, self.device = drafter, opts, device
        if features is None:
            self.tokens, codes, scales, starts = ds.arrays()
            self.codes, self.scales = torch.from_numpy(codes), torch.from_numpy(scales)
        else:
            (self.tokens, starts), (self.codes, self.scales) = ds.token_arrays(), features
        # on a GPU the whole feature array moves to it once (SmolLM2's 1M answer tokens: 4 GB), so a step gathers
        # its context there instead of reading the memory map on the host, which took most of a GPU step's time
        if device.type != "cpu" and self.codes.device.type != device.type:
            try:
                self.codes, self.scales = self.codes.to(device), self.scales.to(device)
            except torch.OutOfMemoryError:  # a dataset larger than the GPU: steps read both host copies (neither
                pass                        # is replaced unless both copies were made)
        usable = [(int(r), s) for r, s in zip(starts, ds.sequences) if trainable(s)]
        if not usable:
            raise UserError("no answer in the dataset is 2 tokens or longer: nothing to train on")
        held = held_out_groups(ds.sequences)
        # (first row, prompt length, length)
        self.seqs = [(r, s.n_prompt, s.n_tokens) for r, s in usable if s.group not in held]
        self.held_out = [(r, s.n_prompt, s.n_tokens) for r, s in usable if s.group in held]
        self.best: dict[str, Tensor] | None = None  # weights of the best held-out tau so far, on the host
        self.best_tau, self.best_step = float("nan"), 0
        self.weights = position_weights(drafter.cfg.block_size).to(device)
        self.rng = np.random.default_rng(opts.seed)
        self.opt = torch.optim.AdamW(drafter.parameters(), lr=opts.lr, betas=(0.9, 0.95),
                                     weight_decay=opts.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.step_no = 0

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to zero at opts.steps."""
        warm = max(1, round(self.opts.warmup * self.opts.steps))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.opts.steps - warm))))

    def sample(self, pool: list[tuple[int, int, int]] | None = None, rng: np.random.Generator | None = None) -> Blocks:
        """Blocks of o.batch sequences of pool (the training sequences) at o.anchors random answer positions each,
        drawn with rng (the trainer's)."""
        o = self.opts
        pool = self.seqs if pool is None else pool
        rng = self.rng if rng is None else rng
        picks = []
        for i in rng.choice(len(pool), size=min(o.batch, len(pool)), replace=False):
            start, n_prompt, n = pool[i]
            candidates = np.arange(n_prompt, n - 1)  # the last token has nothing after it to predict
            picks.append((start, n, np.sort(rng.choice(candidates, size=min(o.anchors, len(candidates)),
                                                       replace=False))))
        return self.blocks(picks)

    def blocks(self, picks: list[tuple[int, int, np.ndarray]]) -> Blocks:
        """The blocks of sequences (first row, length, ascending anchors)."""
        cfg = self.drafter.cfg
        seqs = []
        for start, n, a in picks:
            tok = self.tokens[start:start + n]
            blk = np.full((len(a), cfg.block_size), cfg.mask_token_id, dtype=np.int64)
            blk[:, 0] = tok[a]
            nxt = a[:, None] + np.arange(1, cfg.block_size)
            labels = np.where(nxt < n, tok[np.minimum(nxt, n - 1)], IGNORE).astype(np.int64)
            seqs.append((start, a, blk, labels))
        # one gather of every sequence's context rows (the rows past a sequence's last anchor repeat its last one:
        # padding, never seen, but finite), rather than a few small kernels per sequence
        n_ctx = -(-max(int(a[-1]) for _, a, _, _ in seqs) // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE
        rows = np.stack([start + np.minimum(np.arange(n_ctx), int(a[-1]) - 1) for start, a, _, _ in seqs])
        rows_t = torch.from_numpy(rows).to(self.codes.device)
        features = decode_features(self.codes[rows_t].to(self.device), self.scales[rows_t].to(self.device))
        return Blocks(features, *(self._to_device(pad_stack([s[k] for s in seqs], fill))
                                  for k, fill in ((1, 0), (2, cfg.mask_token_id), (3, IGNORE))))

    def _to_device(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        # from pinned memory the copy is queued behind the GPU's work instead of waiting for it
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def loss(self, b: Blocks) -> tuple[Tensor, Tensor]:
        """Weighted cross-entropy of the masked positions, and the mean accepted prefix + 1 (a tau estimate)."""
        logits = self._draft_logits(b).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), b.labels.flatten(), ignore_index=IGNORE,
                                               reduction="none").view_as(b.labels)
        w = self.weights * (b.labels != IGNORE)
        # padding blocks (labels all IGNORE) are computed and left out here: selecting the real ones would make the
        # host wait for the GPU to learn how many there are
        real = b.labels[..., 0] != IGNORE
        return (ce * w).sum() / w.sum(), (accepted(logits, b.labels) * real).sum() / real.sum() + 1

    def _draft_logits(self, b: Blocks) -> Tensor:
        """Logits [S, N, B-1, n_vocab] of the drafts of b's blocks (b.labels are theirs)."""
        d = self.drafter
        h = d.hidden_seqs(b.features, b.anchors, b.tokens)[:, :, 1:]  # the anchor's own output is not a draft
        return h @ d.lm_head.T

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def step(self, batch: Blocks) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns the loss and tau estimate of the batch before the update, on the device:
        reading them waits for the step, which a GPU otherwise runs while the host samples the next batch."""
        self.drafter.train()
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss, tau = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.opts.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step_no += 1
        return loss.detach(), tau.detach()

    def held_out_tau(self, pool: list[tuple[int, int, int]] | None = None, n: int = WALK_SEQS) -> float:
        """tau of greedy decoding of the first WALK_TOKENS answer tokens of n sequences spread over pool (default:
        the held-out ones), simulated on their stored answers and features: each pass is anchored where the last
        one's accepted drafts end, as in the engine (bench/HISTORY.md: the two agree)."""
        pool = self.held_out if pool is None else pool
        pool = pool[::max(1, len(pool) // n)][:n]
        self.drafter.eval()
        taus = []
        with torch.no_grad(), self._autocast():
            for start, n_prompt, length in pool:  # one sequence at a time: a block at every answer position
                end = min(length - 1, n_prompt + WALK_TOKENS)
                b = self.blocks([(start, length, np.arange(n_prompt, end))])
                taus.append(decoding_tau(accepted(self._draft_logits(b).float(), b.labels)[0].tolist()))
        return float(np.mean(taus))

    def checkpoint(self, path: Path) -> float:
        """Keep the weights if held-out tau is the best so far, then save the checkpoint; returns held-out tau
        (nan when nothing is held out)."""
        tau = float("nan")
        if self.held_out:
            tau = self.held_out_tau()
            if not tau <= self.best_tau:  # also the first time (nan)
                self.best_tau, self.best_step = tau, self.step_no
                self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.drafter.state_dict().items()}
        self.save(path)
        return tau

    def checkpoint_given(self, checkpoint: Path, console: Console) -> None:
        """The checkpoint of trained weights given to start from (dflash train --init), before any step: training on
        from a drafter can make it worse on the held-out answers (bench/HISTORY.md), so they may be exported."""
        if self.held_out:
            console.print(f"step 0 (the given weights): held-out tau {self.checkpoint(checkpoint):.2f}",
                          highlight=False)

    def use_best(self) -> None:
        """The weights of the best held-out tau into the drafter, for the export."""
        if self.best is not None:
            self.drafter.load_state_dict(self.best)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": self.step_no, "config": asdict(self.drafter.cfg), "model": self.drafter.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "rng": self.rng.bit_generator.state,
                    "best": self.best, "best_tau": self.best_tau, "best_step": self.best_step}, tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if ck["config"] != asdict(self.drafter.cfg):
            raise UserError(f"checkpoint {path} is of another drafter configuration ({ck['config']})")
        self.drafter.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.rng.bit_generator.state = ck["rng"]
        self.step_no = ck["step"]
        # checkpoints written before the held-out split have no best weights yet
        self.best, self.best_tau = ck.get("best"), ck.get("best_tau", float("nan"))
        self.best_step = ck.get("best_step", 0)

    def run(self, checkpoint: Path, progress: Progress, given_weights: bool = False,
            deadline: float | None = None) -> TrainReport:
        """Steps until opts.steps, saving a checkpoint every opts.checkpoint_every steps and at the end. given_weights:
        the drafter starts from trained weights (dflash train --init), which are a candidate for the export too.
        deadline (unix time): at each checkpoint, opts.steps is set to end then at the rate since the last one."""
        report = TrainReport()
        if given_weights and self.step_no == 0:
            self.checkpoint_given(checkpoint, progress.console)
        task = progress.add_task("training", total=self.opts.steps, completed=self.step_no)
        t0 = time.perf_counter()
        since = (self.step_no, time.time())  # the last checkpoint's step and time, for the rate
        avg = None  # moving averages of loss and tau~ over ~20 steps (single batches are noisy), on the device
        while self.step_no < self.opts.steps:
            now = torch.stack(self.step(self.sample()))
            avg = now if avg is None else 0.95 * avg + 0.05 * now
            report.steps += 1
            saving = self.step_no % self.opts.checkpoint_every == 0 or self.step_no == self.opts.steps
            if saving or report.steps % SHOW_EVERY == 1:
                report.loss, report.tau = avg.tolist()
            if saving:
                held_tau = self.checkpoint(checkpoint)
                if self.held_out:  # a line per checkpoint: the curve stays in the log
                    progress.console.print(f"step {self.step_no}: loss {report.loss:.3f}, held-out tau {held_tau:.2f}",
                                           highlight=False)
                if deadline is not None and self.step_no < self.opts.steps:
                    # the cosine schedule stretches or shrinks with the rate measured so far: a GPU's first steps
                    # run slower, and a rate probed on them ended a run 370 s early (bench/HISTORY.md)
                    rate = (self.step_no - since[0]) / max(time.time() - since[1], 1e-9)
                    self.opts.steps = self.step_no + max(1, int(0.97 * rate * (deadline - time.time())))
                    progress.update(task, total=self.opts.steps)
                since = (self.step_no, time.time())
            held_out = f", held-out tau {self.best_tau:.2f} at step {self.best_step}" if self.best else ""
            progress.update(task, advance=1,
                            description=f"training (loss {report.loss:.3f}, tau~{report.tau:.2f}{held_out})")
        report.seconds = time.perf_counter() - t0
        report.held_out_tau, report.best_step = self.best_tau, self.best_step
        return report


def accepted(logits: Tensor, labels: Tensor) -> Tensor:
    """Drafts accepted per block: the length of the prefix whose argmax equals the label."""
    return (logits.argmax(-1) == labels).long().cumprod(-1).sum(-1)


def decoding_tau(acc: list[int]) -> float:
    """Tokens per pass of greedy decoding where a block anchored at answer position i gets acc[i] drafts accepted:
    each pass is anchored where the last one's accepted drafts end, after the target's own token."""
    a = passes = 0
    while a < len(acc):
        a, passes = a + acc[a] + 1, passes + 1
    return a / passes


def encode_features(x: Tensor) -> tuple[Tensor, Tensor]:
    """A Dataset's float8 e4m3 codes [rows, width] (uint8) and scales [rows, n_extract] of features x [rows,
    n_extract, n_embd], as native.Capture.rows_e4m3 gives them: each layer's values over their largest magnitude /
    E4M3_MAX (1 when all are 0), rounded to nearest even."""
    scale = x.abs().amax(-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, 1.0)
    codes = (x / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.flatten(-2), scale


def decode_features(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 features [rows, width] from a Dataset's float8 e4m3 codes [rows, width] and scales [rows, n_extract]."""
    values = codes.view(torch.float8_e4m3fn).float().unflatten(-1, (scales.shape[-1], -1))
    return (values * scales[..., None]).flatten(-2)


def pad_stack(arrays: list[np.ndarray], fill: float) -> np.ndarray:
    """Arrays of one rank stacked along a new first axis, each padded at the end of every axis with fill."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.full((len(arrays), *shape), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out
