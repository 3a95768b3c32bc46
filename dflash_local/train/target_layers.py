"""Which target layers a drafter reads. Torch-free: `dflash train` checks --target-layers in the process that
runs llama.cpp."""

from __future__ import annotations

from dflash_local.errors import UsageError, UserError

AUTO_EXTRACT = 5  # layers the z-lab drafters read


def auto_target_layers(depth: int) -> tuple[int, ...]:
    """Up to AUTO_EXTRACT layers spread like the z-lab configs, HF ids 1 .. depth-3, in GGUF numbering (+1)."""
    hi = max(depth - 2, 1)
    lo = min(2, hi)
    n = min(AUTO_EXTRACT, hi - lo + 1)
    return tuple(sorted({round(lo + i * (hi - lo) / max(n - 1, 1)) for i in range(n)}))


def parse_target_layers(spec: str, depth: int) -> tuple[int, ...]:
    """`auto` or comma-separated GGUF layer ids (HF id + 1: the input of llama.cpp layer L)."""
    if depth < 2:
        raise UserError(f"the target has {depth} layer(s): a drafter needs a hidden state below the last layer")
    if spec == "auto":
        return auto_target_layers(depth)
    try:
        ids = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--target-layers must be 'auto' or comma-separated layer ids, not {spec!r}") from None
    if bad := [i for i in ids if not 1 <= i <= depth - 1]:
        raise UsageError(f"--target-layers {bad} are outside 1..{depth - 1}: the target has {depth} layers "
                        "(GGUF numbering: layer L reads the output of layer L-1; llama.cpp trims the last one)")
    if len(set(ids)) != len(ids):
        raise UsageError(f"--target-layers repeats a layer: {spec}")
    return ids
