"""The `dflash` GGUF format as this runtime reads it, declared once: every metadata key with its type and limits,
which keys are required, which are refused (they configure a feature this runtime does not implement), and the
tensors with their shapes and types.

Declarations only. gguf_io writes and reads drafters by them, schema_check checks a file against them in Python
(the converter's reader and `dflash run`'s loader), and the C++ loader checks against native/dflash_schema.h, which
schema_header writes from this module (a test keeps the two in step). Relations between values (head sizes,
RoPE sections) are rules in those two checkers, listed in schema_check.

Layout: upstream llama.cpp's architecture `dflash` (src/models/dflash.cpp). The drafter shares the target's token
embedding and output head instead of storing them, and carries a copy of the target's tokenizer.
No numpy (nor gguf, which imports it): the command line reads this before llama.cpp is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from dflash_local.gguf_file import ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32

ARCH = "dflash"
MASK_KEY = "tokenizer.ggml.mask_token_id"
MAX_TARGET_LAYERS = 64  # dflash_drafter_info.target_layers
MAX_BLOCK_SIZE = 64  # the drafter's cache holds this many positions past the target's context (loader.open_drafter)
INT32_MAX = 2**31 - 1  # sizes and ids are int32 in the C++ loader
DEFAULT_BLOCK_SIZE = 16  # DFlash's


class Kind(Enum):
    """What a value must be: INT any GGUF integer type, FLOAT float32 or float64, INTS an array of integers."""

    INT = "an integer"
    FLOAT = "a float"
    BOOL = "a bool"
    STRING = "a string"
    INTS = "an integer array"


WRITTEN_AS = {  # the GGUF value type (and element type) the writer gives each kind
    Kind.INT: (UINT32, None), Kind.FLOAT: (FLOAT32, None), Kind.BOOL: (BOOL, None), Kind.STRING: (STRING, None),
    Kind.INTS: (ARRAY, INT32),
}


@dataclass(frozen=True)
class Key:
    name: str
    kind: Kind
    required: bool = False
    default: float | None = None  # assumed when absent (defaults that depend on other keys: schema_check)
    minimum: int = 0  # INT and INTS (each element)
    maximum: int = INT32_MAX
    max_len: int = 0  # INTS: the most elements
    refused: str = ""  # the feature the key configures, which this runtime does not implement: refused ...
    harmless: tuple[float | str, ...] = ()  # ... unless its value is one of these, which leave the feature off


def _k(name: str, kind: Kind, **kw: object) -> Key:
    return Key(f"{ARCH}.{name}", kind, **kw)  # type: ignore[arg-type]


def _refused(name: str, kind: Kind, feature: str, *harmless: float | str) -> Key:
    return _k(name, kind, refused=feature, harmless=harmless)


_I, _F, _B, _S = Kind.INT, Kind.FLOAT, Kind.BOOL, Kind.STRING
KEYS: tuple[Key, ...] = (
    # the drafter's shape and what it computes
    _k("embedding_length", _I, required=True, minimum=1),
    _k("block_count", _I, required=True, minimum=1),
    _k("feed_forward_length", _I, required=True, minimum=1),
    _k("attention.head_count", _I, required=True, minimum=1),
    _k("attention.head_count_kv", _I, minimum=1),  # default: head_count
    _k("attention.key_length", _I, minimum=2),  # the head size; default: embedding_length / head_count
    _k("attention.value_length", _I, minimum=1),  # must equal the head size
    _k("attention.layer_norm_rms_epsilon", _F, required=True),
    _k("rope.freq_base", _F, default=10000.0),
    _k("rope.dimension_count", _I, minimum=1),  # must equal the head size (no partial RoPE)
    _k("rope.dimension_sections", Kind.INTS, max_len=4),  # M-RoPE targets: [head size / 2, 0, 0, 0]
    _k("target_layers", Kind.INTS, required=True, minimum=1, max_len=MAX_TARGET_LAYERS),  # HF layer ids + 1
    _k("block_size", _I, default=DEFAULT_BLOCK_SIZE, minimum=2, maximum=MAX_BLOCK_SIZE),
    _k("embedding_scale", _F),
    Key(MASK_KEY, _I, required=True),
    # informational: read by nothing that computes
    _k("context_length", _I),
    _k("vocab_size", _I),
    _k("rope.scaling.original_context_length", _I),
    _k("rope.scaling.finetuned", _B),
    # features this runtime does not implement
    _refused("attention.causal", _B, "causal attention inside the block", False),
    _refused("attention.sliding_window", _I, "sliding-window attention", 0),
    _refused("attention.scale", _F, "a custom attention scale", 0.0),
    _refused("attention.output_scale", _F, "scaled attention output", 1.0),
    _refused("attention.value_scale", _F, "scaled attention values", 0.0, 1.0),
    _refused("attention.clamp_kqv", _F, "clamped Q/K/V", 0.0),
    _refused("attention.max_alibi_bias", _F, "ALiBi position biases", 0.0),
    _refused("attention.layer_norm_epsilon", _F, "LayerNorm (this runtime has RMSNorm only)"),
    _refused("attn_logit_softcapping", _F, "attention soft-capping", 0.0),
    _refused("final_logit_softcapping", _F, "logit soft-capping", 0.0),
    _refused("logit_scale", _F, "logit scaling", 1.0),
    _refused("residual_scale", _F, "residual scaling", 1.0),
    _refused("use_parallel_residual", _B, "parallel residual blocks", False),
    _refused("hidden_activation", _S, "an MLP activation other than silu", "silu"),
    _refused("rope.scaling.type", _S, "RoPE scaling", "none"),
    _refused("rope.scaling.factor", _F, "RoPE scaling", 0.0, 1.0),
    _refused("rope.scale_linear", _F, "RoPE scaling", 1.0),
    _refused("rope.scaling.attn_factor", _F, "RoPE attention scaling", 1.0),
    _refused("expert_count", _I, "a mixture of experts", 0),
    _refused("hyper_connection_count", _I, "hyper-connections", 0),
    _refused("conv_kernel_size", _I, "DFlash2 convolutions"),
    _refused("conv_group_size", _I, "DFlash2 convolutions"),
    _refused("selector_rank", _I, "DFlash2 selectors"),
    _refused("selector_top_k", _I, "DFlash2 selectors"),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


class Dim(Enum):
    """A tensor dimension, in terms of the keys."""

    EMBD = "embedding_length"
    FEATURES = "embedding_length * len(target_layers)"  # the target's features, concatenated
    Q = "head_count * head size"
    KV = "head_count_kv * head size"
    HEAD = "head size"
    FF = "feed_forward_length"


class GGMLType(IntEnum):
    """ggml tensor types the drafter's tensors may have (values: ggml's enum ggml_type)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


NORM_TYPES = (GGMLType.F32,)  # vectors: ggml multiplies by them in f32 only
MATRIX_TYPES = tuple(GGMLType)  # what ggml's matrix products take on every backend (no integer types)


@dataclass(frozen=True)
class Tensor:
    name: str  # GGUF name; per-layer tensors without their "blk.{i}." prefix
    hf: str  # Hugging Face (z-lab) name; per-layer tensors without their "layers.{i}." prefix
    shape: tuple[Dim, ...]  # ggml order: ne[0], the row, first (Hugging Face's order reversed)


GLOBAL_TENSORS = (
    Tensor("fc.weight", "fc.weight", (Dim.FEATURES, Dim.EMBD)),
    Tensor("enc.output_norm.weight", "hidden_norm.weight", (Dim.EMBD,)),
    Tensor("output_norm.weight", "norm.weight", (Dim.EMBD,)),
)
LAYER_TENSORS = (  # in the order of the C++ loader's dflash_layer
    Tensor("attn_norm.weight", "input_layernorm.weight", (Dim.EMBD,)),
    Tensor("attn_q.weight", "self_attn.q_proj.weight", (Dim.EMBD, Dim.Q)),
    Tensor("attn_k.weight", "self_attn.k_proj.weight", (Dim.EMBD, Dim.KV)),
    Tensor("attn_v.weight", "self_attn.v_proj.weight", (Dim.EMBD, Dim.KV)),
    Tensor("attn_output.weight", "self_attn.o_proj.weight", (Dim.Q, Dim.EMBD)),
    Tensor("attn_q_norm.weight", "self_attn.q_norm.weight", (Dim.HEAD,)),
    Tensor("attn_k_norm.weight", "self_attn.k_norm.weight", (Dim.HEAD,)),
    Tensor("ffn_norm.weight", "post_attention_layernorm.weight", (Dim.EMBD,)),
    Tensor("ffn_gate.weight", "mlp.gate_proj.weight", (Dim.EMBD, Dim.FF)),
    Tensor("ffn_up.weight", "mlp.up_proj.weight", (Dim.EMBD, Dim.FF)),
    Tensor("ffn_down.weight", "mlp.down_proj.weight", (Dim.FF, Dim.EMBD)),
)
# every other tensor is refused: it belongs to a feature this runtime does not implement (the token embedding and
# output head come from the target)
