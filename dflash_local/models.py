"""Where models come from: a target argument (a GGUF file or a built-in model's name), and drafters for a target."""

from __future__ import annotations

from pathlib import Path

from dflash_local import model_files
from dflash_local.errors import UserError
from dflash_local.model_registry import DEFAULT_MODEL, MODELS, BuiltinModel

SHIPPED_DRAFTERS = Path(__file__).with_name("drafters")


def resolve_target(target: str | Path | None) -> Path:
    """The GGUF for a target argument: a file that exists, else a built-in model's name; None: the default model."""
    if target is None:
        return default_target()
    if Path(target).is_file():  # a file wins over a name
        return Path(target)
    if str(target) in MODELS:
        return builtin_path(MODELS[str(target)])
    raise UserError(f"target model not found: {target} is neither a file nor a built-in model "
                    f"({', '.join(MODELS)}; see `dflash models`)")


def default_target() -> Path:
    return builtin_path(MODELS[DEFAULT_MODEL])


def builtin_path(model: BuiltinModel) -> Path:
    """A built-in model's GGUF: where its package put it, or assembled in the cache from its parts on first use."""
    if model.assembled:
        return model_files.cached(model) or model_files.assemble(model)
    path = model_files.part_files(model)[0]
    if path.stat().st_size != model.size:
        raise UserError(f"{path} has {path.stat().st_size} bytes, not the {model.size} of the built-in model "
                        f"{model.name}: run `{model_files.reinstall_command(model.parts)}`")
    return path


def installed(model: BuiltinModel) -> str:
    """What `dflash models` says of a built-in model: whether it can run, and if it must be assembled first."""
    if model.assembled and model_files.cached(model):
        return "yes, assembled"
    _, missing = model_files.find_parts(model)
    if not missing:
        return "parts present" if model.assembled else "yes"
    if len(missing) < len(model.parts):
        return f"no: {len(missing)} of {len(model.parts)} parts missing"
    return "no"


def shipped_drafter(model: BuiltinModel) -> Path | None:
    path = SHIPPED_DRAFTERS / model.drafter if model.drafter else None
    return path if path is not None and path.is_file() else None


def find_drafter(target: Path) -> Path | None:
    """A drafter next to the target (<name>-dflash*.gguf), else one shipped for it, else None."""
    for folder in (target.parent, SHIPPED_DRAFTERS):
        found = sorted(folder.glob(f"{target.stem}-dflash*.gguf"))
        if found:
            return found[0]
    return None
