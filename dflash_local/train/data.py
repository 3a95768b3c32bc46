"""The training set on disk: the target's own answers to prompts, with the target's hidden states at the
drafter's layers for every position (prompt and answer). answers.py fills it; numpy alone reads it.

On disk, one folder:
  index.json    what the features are (target file, layers, width) and the sequences in order:
                {"key": prompt hash, "n_prompt": tokens of the templated prompt, "n_tokens": prompt + answer}
  tokens.i32    int32 tokens of all sequences back to back
  features.f16  float16 [rows, n_extract * n_embd], row i = the position of token i
Sequences are appended and the index is rewritten after each one, so an interrupted run resumes where it
stopped; rows past the index (a write cut short) are dropped when the folder is opened again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dflash_local.errors import UserError

INDEX, TOKENS, FEATURES = "index.json", "tokens.i32", "features.f16"


@dataclass(frozen=True)
class Sequence:
    key: str
    n_prompt: int
    n_tokens: int


def prompt_key(text: str, chat: bool) -> str:
    return hashlib.sha256(text.encode() + (b"" if chat else b"\0raw")).hexdigest()[:16]


class Dataset:
    """A dataset folder for one target and one set of capture layers (created if absent)."""

    def __init__(self, root: Path, target: Path, target_layers: tuple[int, ...], n_embd: int):
        self.root = root
        self.meta = {"target": target.name, "target_bytes": target.stat().st_size,
                     "target_layers": list(target_layers), "n_embd": n_embd}
        self.width = len(target_layers) * n_embd
        self.sequences: list[Sequence] = []
        index = root / INDEX
        if index.is_file():
            saved = json.loads(index.read_text())
            if saved["meta"] != self.meta:
                raise UserError(f"{root} holds data of another target or layer choice ({saved['meta']}); "
                                "give another --data-dir")
            self.sequences = [Sequence(**s) for s in saved["sequences"]]
        root.mkdir(parents=True, exist_ok=True)
        for name, row_bytes in ((TOKENS, 4), (FEATURES, 2 * self.width)):
            with open(root / name, "ab") as f:
                f.truncate(self.n_rows * row_bytes)

    @property
    def n_rows(self) -> int:
        return sum(s.n_tokens for s in self.sequences)

    @property
    def row_bytes(self) -> int:
        return 4 + 2 * self.width

    @property
    def anchor_positions(self) -> int:
        """Answer positions with a next token, i.e. usable as anchors: one epoch visits each once on average."""
        return sum(max(0, s.n_tokens - s.n_prompt - 1) for s in self.sequences)

    def keys(self) -> set[str]:
        return {s.key for s in self.sequences}

    def append(self, key: str, tokens: list[int], n_prompt: int, features: np.ndarray) -> None:
        if features.shape != (len(tokens), self.width):
            raise ValueError(f"features {features.shape} do not match {len(tokens)} tokens x {self.width}")
        for name, data in ((TOKENS, np.asarray(tokens, dtype=np.int32)), (FEATURES, features.astype(np.float16))):
            with open(self.root / name, "ab") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
        self.sequences.append(Sequence(key, n_prompt, len(tokens)))
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "sequences": [asdict(s) for s in self.sequences]}))
        os.replace(tmp, self.root / INDEX)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [rows], features [rows, width] memory-mapped, first row of each sequence)."""
        n = self.n_rows
        if n == 0:
            raise UserError(f"{self.root} holds no sequences")
        tokens = np.fromfile(self.root / TOKENS, dtype=np.int32, count=n)
        # copy-on-write: writable for torch.from_numpy, which warns on read-only arrays; the file is never changed
        features = np.memmap(self.root / FEATURES, dtype=np.float16, mode="c", shape=(n, self.width))
        starts = np.cumsum([0] + [s.n_tokens for s in self.sequences[:-1]])
        return tokens, features, starts
