"""AutoAWQ checkpoints of llama, qwen2 and qwen3 models -> target GGUFs that llama.cpp runs (issue 29).

The AWQ linear layers become Q4_1 (their 4-bit codes carried over exactly, convert/awq.py) or f16; every other
tensor keeps its values (1-D tensors as f32, as llama.cpp's converter writes them). Metadata and the tokenizer
follow llama.cpp's convert_hf_to_gguf.py for these architectures.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch

from dflash_local.convert import awq
from dflash_local.convert.gguf_target import ConversionError, write_gguf
from dflash_local.convert.hf import load_tensors, resolve_source

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
OUTTYPES = {"q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "f16": gguf.LlamaFileType.MOSTLY_F16}
_PERMUTED_QK = {"llama"}  # llama.cpp's llama arch ropes interleaved pairs: its converter permutes Q and K rows
# GPT-2 style BPE pre-tokenizer per architecture. llama.cpp's converter picks it by hashing the tokenizer's output
# (which needs transformers); these are the families' own: Qwen's regex, and Llama 3's for a llama-arch BPE
# tokenizer, which other llama-arch models (SmolLM2: `smollm`) do not share, hence a warning
_BPE_PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
_BPE_PRE_GUESSED = {"llama"}
# (arch, rope_type) converted: Llama 3.1's scaling, which llama.cpp reads as a rope_freqs tensor
_ROPE_SCALINGS = {("llama", "llama3")}
_DROPPED = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp
# weights every model of the arch has (GGUF names; blk.* per layer): missing ones are reported before writing
_REQUIRED = ("token_embd", "output_norm")
_REQUIRED_PER_LAYER = {
    "llama": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"),
}
_REQUIRED_PER_LAYER |= {"qwen2": _REQUIRED_PER_LAYER["llama"],
                        "qwen3": (*_REQUIRED_PER_LAYER["llama"], "attn_q_norm", "attn_k_norm")}
_DOWNLOAD = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


class Hparams(NamedTuple):
    arch: str
    n_ctx: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # also the rotary dimensions: these architectures rope the whole head
    n_vocab: int  # the embedding's rows, at least the tokenizer's tokens
    rms_eps: float
    rope_base: float
    rope_scaling: dict[str, Any] | None  # one of _ROPE_SCALINGS, or None


_HPARAM_KEYS = {  # GGUFWriter method -> Hparams field it writes
    "add_context_length": "n_ctx", "add_embedding_length": "n_embd", "add_block_count": "n_layer",
    "add_feed_forward_length": "n_ff", "add_head_count": "n_head", "add_head_count_kv": "n_head_kv",
    "add_key_length": "head_dim", "add_value_length": "head_dim", "add_rope_dimension_count": "head_dim",
    "add_layer_norm_rms_eps": "rms_eps", "add_rope_freq_base": "rope_base", "add_vocab_size": "n_vocab",
}


def _arch(config: dict[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        archs = config.get("architectures") or []
        raise ConversionError(f"{where}: model_type = {model_type!r} ({', '.join(archs) or 'no architectures'}): "
                              f"architecture not supported; AWQ targets of {', '.join(ARCHS)} are")
    return model_type


def parse_hparams(config: dict[str, Any], where: str) -> Hparams:
    """The target's shapes and constants from config.json, refusing what these architectures do not run."""
    arch = _arch(config, where)

    def need(name: str) -> Any:
        if (v := config.get(name)) is None:
            raise ConversionError(f"{where}: missing required field {name!r}")
        return v

    if (v := config.get("hidden_act", "silu")) != "silu":
        raise ConversionError(f"{where}: hidden_act = {v!r}: only silu is converted")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default") and (arch, kind) not in _ROPE_SCALINGS:
        raise ConversionError(f"{where}: rope scaling of type {kind!r} (rope_scaling / rope_parameters): "
                              f"not converted for {arch}")
    if config.get("use_sliding_window"):
        raise ConversionError(f"{where}: use_sliding_window = true: sliding-window attention is not converted")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    return Hparams(arch=arch, n_embd=n_embd, n_layer=need("num_hidden_layers"), n_head=n_head,
                   n_head_kv=config.get("num_key_value_heads") or n_head,
                   head_dim=config.get("head_dim") or n_embd // n_head, n_ff=need("intermediate_size"),
                   n_vocab=need("vocab_size"), n_ctx=need("max_position_embeddings"), rms_eps=need("rms_norm_eps"),
                   rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                   rope_scaling=rope if kind not in (None, "default") else None)


def _llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp's per-dimension divisors of the frequencies (rope_freqs): 1 for
    wavelengths under the original context / high_freq_factor, `factor` over original context / low_freq_factor,
    interpolated smoothly between (transformers' _compute_llama3_parameters, llama.cpp's converter)."""
    r = hp.rope_scaling or {}
    factor, low, high = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old_ctx = r.get("original_max_position_embeddings", 8192)
    freqs = hp.rope_base ** -(np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _write_hparams(w: gguf.GGUFWriter, hp: Hparams) -> None:
    for method, field in _HPARAM_KEYS.items():
        getattr(w, method)(getattr(hp, field))


def _write_vocab(w: gguf.GGUFWriter, folder: Path, hp: Hparams) -> None:
    """Tokens (padded to the embedding's rows, as llama.cpp's converter does), merges and special tokens."""
    vocab: gguf.Vocab
    try:
        vocab = gguf.BpeVocab(folder)
    except FileNotFoundError:
        if not (folder / "tokenizer.model").exists():
            raise ConversionError(f"{folder}: no tokenizer this converter reads: neither a byte-level BPE "
                                  f"tokenizer.json nor a SentencePiece tokenizer.model") from None
        try:
            vocab = gguf.SentencePieceVocab(folder)
        except RuntimeError as e:  # sentencepiece is missing
            raise ConversionError(f"{folder / 'tokenizer.model'}: {e} (pip install sentencepiece)") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in _plain_added_tokens(folder):  # gguf.vocab makes every added token CONTROL; llama.cpp's converter does
        types[i] = gguf.TokenType.USER_DEFINED  # that only for special ones: the others are text, e.g. <tool_call>
    if len(tokens) > hp.n_vocab:
        raise ConversionError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than vocab_size {hp.n_vocab}")
    for i in range(len(tokens), hp.n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    if isinstance(vocab, gguf.BpeVocab):
        w.add_tokenizer_pre(_BPE_PRE[hp.arch])
        if hp.arch in _BPE_PRE_GUESSED:
            warnings.warn(f"{folder}: a {hp.arch} model with a BPE tokenizer: pre-tokenizer assumed to be Llama 3's "
                          f"({_BPE_PRE[hp.arch]!r}); text splits differently if the model's is another", stacklevel=2)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=isinstance(vocab, gguf.BpeVocab), n_vocab=hp.n_vocab)
    special.add_to_gguf(w, quiet=True)  # merges, bos/eos/pad ids, add_bos, the chat template


def _plain_added_tokens(folder: Path) -> list[int]:
    """Ids of tokenizer.json's added tokens that are not special."""
    try:
        added = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens") or []
    except (OSError, ValueError):
        return []
    return [t["id"] for t in added if not t.get("special", True)]


def _row_order(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K `permute` as a row order: each head's two rotary halves interleaved."""
    return np.arange(n_rows).reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16; f32 holds it exactly


class _Tensors:
    """The checkpoint's tensors, taken one module at a time so that leftovers can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.left = {name: t for name, t in tensors.items() if not name.endswith(_DROPPED)}

    def modules(self) -> list[str]:
        """Module names (without .weight, .bias, .qweight...) in checkpoint order."""
        return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in self.left))

    def take(self, name: str) -> np.ndarray | None:
        t = self.left.pop(name, None)
        return None if t is None else _numpy(t)


def _quant_config(config: dict[str, Any], folder: Path) -> tuple[dict[str, Any] | None, str]:
    """config.json's quantization_config, or the quant_config.json of older AutoAWQ releases (AWQ implied), and
    where it was found."""
    if (q := config.get("quantization_config")) is not None or not (path := folder / "quant_config.json").exists():
        return q, str(folder / "config.json")
    try:
        return {"quant_method": "awq", **json.loads(path.read_text())}, str(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable ({e})") from None


def convert_awq_target(src: Path | str, out: Path | str, outtype: str = "q4_1", *, progress: bool = False) -> Path:
    """Convert an AutoAWQ GEMM checkpoint to a target GGUF; nothing is written on failure."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    folder = resolve_source(src, _DOWNLOAD)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{config_path}: unreadable config ({e})") from None
    hp = parse_hparams(config, str(config_path))
    qcfg = awq.parse_quant_config(*_quant_config(config, folder))

    w = gguf.GGUFWriter(None, arch=gguf.MODEL_ARCH_NAMES[ARCHS[hp.arch]])
    w.add_name(Path(src).resolve().name if Path(src).exists() else str(src))
    w.add_file_type(OUTTYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(w, hp)
    _write_vocab(w, folder, hp)
    data = _add_tensors(w, _Tensors(load_tensors(folder)), hp, qcfg, outtype)
    _check_complete(w, hp, folder)
    return write_gguf(w, Path(out), data, len(data), progress=progress)


def _check_complete(w: gguf.GGUFWriter, hp: Hparams, folder: Path) -> None:
    shapes = {name: ti.shape for name, ti in w.tensors[0].items()}
    required = [*_REQUIRED, *(f"blk.{i}.{t}" for i in range(hp.n_layer) for t in _REQUIRED_PER_LAYER[hp.arch])]
    if missing := [f"{name}.weight" for name in required if f"{name}.weight" not in shapes]:
        raise ConversionError(f"{folder}: missing tensors for a {hp.n_layer}-layer {hp.arch} model "
                              f"(GGUF names): {', '.join(missing)}")
    if (rows := shapes["token_embd.weight"][0]) != hp.n_vocab:  # numpy order: [n_vocab, n_embd]
        raise ConversionError(f"{folder}: the token embedding has {rows} rows, but vocab_size is {hp.n_vocab}")


def _add_tensors(w: gguf.GGUFWriter, tensors: _Tensors, hp: Hparams, qcfg: awq.AwqConfig,
                 outtype: str) -> list[np.ndarray]:
    """Every tensor's info added to w; returns their data in the same order."""
    data: list[np.ndarray] = []

    def add(name: str, array: np.ndarray, raw_dtype: gguf.GGMLQuantizationType | None = None) -> None:
        w.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw_dtype)
        data.append(array)

    if hp.rope_scaling is not None:  # the only one converted: llama3
        add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(hp))
    arch = ARCHS[hp.arch]
    names = gguf.TensorNameMap(arch, hp.n_layer)
    allowed = set(gguf.MODEL_TENSORS[arch])
    permuted = {gguf.MODEL_TENSOR.ATTN_Q: hp.n_head, gguf.MODEL_TENSOR.ATTN_K: hp.n_head_kv} \
        if hp.arch in _PERMUTED_QK else {}
    for module in tensors.modules():
        found = names.get_type_and_name(module) or names.get_type_and_name(f"model.{module}")
        if found is None or found[0] not in allowed:
            extra = sorted(n for n in tensors.left if n.startswith(f"{module}."))
            raise ConversionError(f"tensors {', '.join(extra)} are not part of a {hp.arch} model")
        kind, gname = found
        n_head = permuted.get(kind)
        if all(f"{module}.{s}" in tensors.left for s in awq.AWQ_SUFFIXES):
            lin = awq.read_linear(module, *(tensors.take(f"{module}.{s}") for s in awq.AWQ_SUFFIXES), qcfg)
            if n_head:
                lin = lin.permute_rows(_row_order(lin.codes.shape[0], n_head))
            if outtype == "q4_1":
                add(f"{gname}.weight", lin.to_q4_1(), gguf.GGMLQuantizationType.Q4_1)
            else:
                add(f"{gname}.weight", lin.dequantize().astype(np.float16))
        for suffix in ("weight", "bias"):
            if (t := tensors.take(f"{module}.{suffix}")) is None:
                continue
            if n_head:
                t = t[_row_order(t.shape[0], n_head)]
            # 1-D tensors (norms, biases) in f32 as llama.cpp's converter writes them; matrices as they are
            add(f"{gname}.{suffix}", np.ascontiguousarray(t.astype(np.float32) if t.ndim == 1 else t))
        if extra := sorted(n for n in tensors.left if n.rsplit(".", 1)[0] == module):
            raise ConversionError(f"tensors {', '.join(extra)}: a partial or unknown quantized layer (AutoAWQ GEMM "
                                  f"has {', '.join(awq.AWQ_SUFFIXES)})")
    return data
