"""Opening a target and its drafter together, with the checks a person can act on."""

from __future__ import annotations

from pathlib import Path

from dflash_local.errors import UserError
from dflash_local.native import Drafter, NativeError
from dflash_local.target import Target, TargetParams, read_gguf_arch
from dflash_local.tree import TREE_SIZE


def open_drafter(path: Path, target_path: Path, n_ctx: int, device: str | None = None,
                 n_threads: int = 0) -> Drafter:
    if not path.is_file():
        raise UserError(f"drafter not found: {path}")
    arch = read_gguf_arch(path)
    if arch != "dflash":
        raise UserError(f"{path} is not a DFlash drafter (architecture '{arch}')")
    try:
        return Drafter(path, target_path, n_ctx=n_ctx, device=device, n_threads=n_threads)
    except NativeError as e:
        raise UserError(f"cannot use drafter {path} with {target_path.name}: {e}") from e


def open_models(target_path: Path, drafter_path: Path | None, params: TargetParams,
                device: str | None = None) -> tuple[Target, Drafter | None]:
    """The target, capturing the layers the drafter reads, and the drafter (or None)."""
    drafter = None
    if drafter_path is not None:
        # room for one block past the target's last position
        drafter = open_drafter(drafter_path, target_path, params.n_ctx + 64, device, params.n_threads)
    layers = drafter.info.target_layers if drafter else ()
    block = drafter.info.block_size if drafter else 0  # the most drafts a step rolls back
    return Target(target_path, params, capture_layers=layers, rollback=block, branches=TREE_SIZE), drafter
