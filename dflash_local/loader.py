"""Opening a target and its drafter together, with the checks a person can act on."""

from __future__ import annotations

from pathlib import Path

from dflash_local.convert.schema import MAX_BLOCK_SIZE
from dflash_local.convert.schema_check import check_drafter
from dflash_local.errors import UserError
from dflash_local.gguf_file import read_layout
from dflash_local.native import Drafter, NativeError
from dflash_local.target import Target, TargetParams, available_cores
from dflash_local.target_check import check_target_file
from dflash_local.tree import TREE_SIZE


def open_drafter(path: Path, target_path: Path, params: TargetParams, device: str | None = None) -> Drafter:
    """The drafter for a target run with params; its context holds one block past the target's last position.
    Both files are checked here first (structure, and the drafter against the schema): the native loader reads both,
    and refuses what the schema refuses, but what ggml's GGUF reader trusts it cannot check."""
    if not path.is_file():
        raise UserError(f"drafter not found: {path}")
    check_target_file(target_path)
    layout = read_layout(path)
    check_drafter(layout.fields, layout.tensors, str(path))
    try:
        return Drafter(path, target_path, n_ctx=params.n_ctx + MAX_BLOCK_SIZE, device=device,
                       n_threads=params.n_threads or available_cores())
    except NativeError as e:
        raise UserError(f"cannot use drafter {path} with {target_path.name}: {e}") from e


def open_target(path: Path, params: TargetParams, drafter: Drafter | None, tree_size: int = TREE_SIZE) -> Target:
    """The target, capturing the layers the drafter reads, with rollback for its blocks and room for trees of tree_size
    drafts (a shared KV buffer and a sequence per leaf, which cost a little on every pass: none without a drafter)."""
    if drafter is None:
        return Target(path, params)
    return Target(path, params, capture_layers=drafter.info.target_layers, rollback=drafter.info.block_size,
                  branches=tree_size)


def open_models(target_path: Path, drafter_path: Path | None, params: TargetParams, device: str | None = None,
                tree_size: int = TREE_SIZE) -> tuple[Target, Drafter | None]:
    """The target and the drafter (or None), as open_target and open_drafter give them."""
    drafter = open_drafter(drafter_path, target_path, params, device) if drafter_path is not None else None
    return open_target(target_path, params, drafter, tree_size), drafter
