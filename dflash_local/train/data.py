"""The training set on disk: the target's own answers to prompts, with the target's hidden states at the
drafter's layers for every position (prompt and answer). answers.py fills it; numpy alone reads it.

On disk, one folder:
  index.json    what the features are (target file, layers, width) and the sequences in order:
                {"key": prompt hash, "n_prompt": tokens of the templated prompt, "n_tokens": prompt + answer,
                 "group": what the prompt came from}
  tokens.i32    int32 tokens of all sequences back to back
  features.e4m3 float8 e4m3 codes [rows, n_extract * n_embd], row i = the position of token i, for the first
                sequences: features are captured after the answers, in a second pass, so they may lag the tokens
  scales.f32    float32 [rows, n_extract]: a row's values at one layer are their codes' values times its scale
                (native.Capture.rows_e4m3). Half the room of float16, which filled a lent GPU machine's disk; the
                shipped drafter's held-out tau on such features was 4.25, on float16 ones 4.23 (bench/HISTORY.md)
Answers are appended and the index is rewritten every few seconds (SAVE_EVERY), so an interrupted run resumes
about where it stopped; rows past the index, or past the last whole sequence of features (a write cut short),
are dropped when the folder is opened again. index.json and tokens.i32 alone (a few MB) are enough to move a data
set to another machine: the features are captured again there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dflash_local.errors import UserError

INDEX, TOKENS, FEATURES, SCALES = "index.json", "tokens.i32", "features.e4m3", "scales.f32"
# the float16 features of data sets written before 2ce42c0: no longer read, captured again in float8
LEGACY_FEATURES = "features.f16"
# seconds between index rewrites: rewritten after every answer, it cost 43 ms per answer at 6,348 answers (dev CPU)
SAVE_EVERY = 5.0


@dataclass(frozen=True)
class Sequence:
    key: str
    n_prompt: int
    n_tokens: int
    group: str  # what the prompt came from (prompts.prompt_group); held-out sets take whole groups


def prompt_key(text: str, chat: bool) -> str:
    return hashlib.sha256(text.encode() + (b"" if chat else b"\0raw")).hexdigest()[:16]


class Dataset:
    """A dataset folder for one target and one set of capture layers (created if absent)."""

    def __init__(self, root: Path, target: Path, target_layers: tuple[int, ...], n_embd: int):
        self.root = root
        self.meta = {"target": target.name, "target_bytes": target.stat().st_size,
                     "target_layers": list(target_layers), "n_embd": n_embd}
        self.n_extract, self.width = len(target_layers), len(target_layers) * n_embd
        self.sequences: list[Sequence] = []
        self._saved_at = time.monotonic()
        index = root / INDEX
        if index.is_file():
            saved = json.loads(index.read_text())
            if saved["meta"] != self.meta:
                raise UserError(f"{root} holds data of another target or layer choice ({saved['meta']}); "
                                "give another --data-dir")
            # data sets written before groups: each sequence its own group
            self.sequences = [Sequence(**{"group": s["key"], **s}) for s in saved["sequences"]]
        root.mkdir(parents=True, exist_ok=True)
        with open(root / TOKENS, "ab") as f:
            f.truncate(self.n_rows * 4)
        feature_rows = min(_size(root / name) // size for name, size in self._feature_files())
        ends = self._offsets()
        self.captured = int(np.searchsorted(ends, feature_rows, side="right")) - 1  # sequences with features
        for name, size in self._feature_files():
            with open(root / name, "ab") as f:
                f.truncate(int(ends[self.captured]) * size)

    @property
    def n_rows(self) -> int:
        return sum(s.n_tokens for s in self.sequences)

    def _offsets(self) -> np.ndarray:
        """First row of each sequence, then the row count."""
        return np.cumsum([0] + [s.n_tokens for s in self.sequences])

    def _feature_files(self) -> tuple[tuple[str, int], ...]:
        """The feature files and their bytes per row."""
        return (FEATURES, self.width), (SCALES, 4 * self.n_extract)

    @property
    def row_bytes(self) -> int:
        return 4 + sum(size for _, size in self._feature_files())

    @property
    def anchor_positions(self) -> int:
        """Answer positions with a next token, i.e. usable as anchors: one epoch visits each once on average."""
        return sum(max(0, s.n_tokens - s.n_prompt - 1) for s in self.sequences)

    def keys(self) -> set[str]:
        return {s.key for s in self.sequences}

    def append(self, key: str, group: str, tokens: list[int], n_prompt: int) -> None:
        """One answered prompt: its tokens, prompt then answer."""
        _append(self.root / TOKENS, np.asarray(tokens, dtype=np.int32))
        self.sequences.append(Sequence(key, n_prompt, len(tokens), group))
        if time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        """The rows appended so far onto the disk, then the index that counts them."""
        for name in (TOKENS, *(name for name, _ in self._feature_files())):
            fd = os.open(self.root / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "sequences": [asdict(s) for s in self.sequences]}))
        os.replace(tmp, self.root / INDEX)
        self._saved_at = time.monotonic()

    def token_lists(self, first: int = 0) -> Iterator[list[int]]:
        """The tokens of each sequence from the first-th on, in order (from captured on: those without features)."""
        tokens = np.fromfile(self.root / TOKENS, dtype=np.int32, count=self.n_rows)
        ends = self._offsets()
        for i in range(first, len(self.sequences)):
            yield tokens[ends[i]:ends[i + 1]].tolist()

    def append_features(self, codes: np.ndarray, scales: np.ndarray) -> None:
        """The features of the next sequence without them, as native.Capture.rows_e4m3 gives them."""
        n = self.sequences[self.captured].n_tokens
        if codes.shape != (n, self.width) or scales.shape != (n, self.n_extract):
            raise ValueError(f"features {codes.shape}, {scales.shape} do not match {n} tokens x {self.width}")
        _append(self.root / FEATURES, np.asarray(codes, dtype=np.uint8))
        _append(self.root / SCALES, np.asarray(scales, dtype=np.float32))
        self.captured += 1

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [rows], first row of each sequence)."""
        n = self.n_rows
        if n == 0:
            raise UserError(f"{self.root} holds no sequences")
        return np.fromfile(self.root / TOKENS, dtype=np.int32, count=n), self._offsets()[:-1]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [rows], feature codes [rows, width] and scales [rows, n_extract] memory-mapped, first row of each
        sequence)."""
        tokens, starts = self.token_arrays()
        if self.captured < len(self.sequences):
            raise UserError(f"{self.root}: {len(self.sequences) - self.captured} sequences have no features yet "
                            "(run dflash train on it again to capture them)")
        # copy-on-write: writable for torch.from_numpy, which warns on read-only arrays; the file is never changed
        codes = np.memmap(self.root / FEATURES, dtype=np.uint8, mode="c", shape=(len(tokens), self.width))
        scales = np.memmap(self.root / SCALES, dtype=np.float32, mode="c", shape=(len(tokens), self.n_extract))
        return tokens, codes, scales, starts


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _append(path: Path, data: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(data))
