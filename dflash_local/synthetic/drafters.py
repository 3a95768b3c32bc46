"""Random-weight DFlash drafters of any shape for a target GGUF, their matrices written as random quantized blocks
(the tests' small float drafters go through the Hugging Face converter instead: tests/synthetic_drafters.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from dflash_local.convert.gguf_io import check_config, check_target, drafter_writer, gguf_names
from dflash_local.convert.gguf_target import read_target
from dflash_local.reference import parameter_shapes
from dflash_local.synthetic.weights import Q, TensorWriter, matrix, norm
from dflash_local.train.trainer import drafter_config

_FILE_TYPES = {Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
               Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, Q.F16: gguf.LlamaFileType.MOSTLY_F16}


@dataclass(frozen=True)
class DrafterShape:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    target_layers: tuple[int, ...]  # GGUF numbering: the Hugging Face target_layer_ids + 1
    mask_token_id: int
    block_size: int = 16


def write_drafter(path: Path, target_gguf: Path, shape: DrafterShape, *, name: str, qtype: Q = Q.Q8_0,
                  seed: int = 0, progress: bool = False) -> Path:
    """A drafter of `shape` for the target: its hidden size, norm epsilon and RoPE base are the target's, its
    matrices random blocks of qtype (norms float32)."""
    cfg = drafter_config(target_gguf, shape.n_layer, shape.target_layers, shape.block_size)
    cfg = dataclasses.replace(cfg, n_head=shape.n_head, n_head_kv=shape.n_head_kv, head_dim=shape.head_dim,
                              n_ff=shape.n_ff, mask_token_id=shape.mask_token_id)
    target = read_target(target_gguf)
    check_config(cfg)
    check_target(cfg, target)
    tw = TensorWriter(drafter_writer(cfg, target, int(_FILE_TYPES[qtype]), name=name),
                      np.random.default_rng([seed, 1 << 20]), lambda spec: qtype)
    names = gguf_names(cfg)
    for hf, dims in parameter_shapes(cfg).items():
        tw.add(norm(names[hf], dims[0]) if len(dims) == 1 else matrix(names[hf], *dims))
    return tw.write(Path(path), progress)
