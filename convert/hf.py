"""Hugging Face DFlash checkpoints (z-lab layout: config.json + *.safetensors) -> `dflash` GGUF."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dflash_local.convert.gguf_io import write_drafter_gguf
from dflash_local.convert.gguf_target import ConversionError, read_target
from dflash_local.reference import DrafterConfig

# config.json fields that do not change what the drafter computes
_METADATA = {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout", "use_cache",
    "tie_word_embeddings", "max_window_layers", "dflash_config",
}
_SUPPORTED_ARCHS = {"DFlashDraftModel"}
_DFLASH2_FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


class HFDrafter(NamedTuple):
    cfg: DrafterConfig
    context_length: int | None  # max_position_embeddings
    mrope: bool
    num_target_layers: int | None


class _Config:
    """config.json with the fields read so far recorded, so that unknown fields are reported, never dropped."""

    def __init__(self, raw: dict[str, Any], path: Path):
        self.raw, self.path, self.used = raw, path, set(_METADATA)
        self.draft = raw.get("dflash_config") or {}

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.raw.get(name, default)

    def draft_get(self, name: str, default: Any = None) -> Any:
        """A DFlash field, in dflash_config or at the top level depending on the release."""
        self.used.add(name)
        return self.draft.get(name, self.raw.get(name, default))

    def require(self, value: Any, name: str) -> Any:
        if value is None:
            raise ConversionError(f"{self.path}: missing required field {name!r}")
        return value

    def refuse(self, name: str, value: Any, why: str) -> None:
        raise ConversionError(f"{self.path}: {name} = {json.dumps(value)}: {why}, "
                              f"which this runtime does not implement")

    def unknown(self) -> list[str]:
        return sorted(self.raw.keys() - self.used) + sorted(f"dflash_config.{k}" for k in self.draft.keys() - self.used)


def parse_config(raw: dict[str, Any], path: Path = Path("config.json")) -> HFDrafter:
    """A DrafterConfig from config.json, refusing every feature the runtime does not run."""
    c = _Config(raw, path)
    if (archs := c.get("architectures")) and not set(archs) <= _SUPPORTED_ARCHS:
        c.refuse("architectures", archs, "only DFlashDraftModel (DFlash v1) is supported")
    for name in _DFLASH2_FIELDS:
        if (v := c.draft_get(name)) is not None:
            c.refuse(name, v, "a DFlash2 convolution/selector drafter")
    if (v := c.get("hidden_act", "silu")) != "silu":
        c.refuse("hidden_act", v, "an MLP activation other than silu")
    for name in ("attention_bias", "mlp_bias"):
        if v := c.get(name):
            c.refuse(name, v, "biases")
    if v := c.get("is_causal"):
        c.refuse("is_causal", v, "causal attention inside the block")
    if v := c.draft_get("causal"):
        c.refuse("causal", v, "causal attention inside the block")
    if v := c.get("use_sliding_window"):
        c.refuse("use_sliding_window", v, "sliding-window attention")
    if v := c.draft_get("use_swa"):
        c.refuse("use_swa", v, "sliding-window attention")
    layer_types = c.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        c.refuse("layer_types", layer_types, "sliding-window attention")
    c.get("sliding_window")  # inert without sliding layers, which are refused above
    if (v := c.draft_get("output_multiplier")) not in (None, 1, 1.0):
        c.refuse("output_multiplier", v, "scaled logits")
    if (v := c.draft_get("final_logit_softcapping")) is not None and v > 0:
        c.refuse("final_logit_softcapping", v, "logit soft-capping")
    if (v := c.draft_get("attention_value_scale")) is not None:
        c.refuse("attention_value_scale", v, "scaled attention values")
    if (v := c.get("rope_is_neox_style", True)) is not True:
        c.refuse("rope_is_neox_style", v, "interleaved (non-NeoX) RoPE")

    rope_parameters, rope_scaling = c.get("rope_parameters"), c.get("rope_scaling")  # newer, older transformers
    rope = rope_parameters or rope_scaling or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default", "mrope"):
        c.refuse("rope_parameters.rope_type", rope_type, "RoPE scaling")
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        c.refuse("partial_rotary_factor", partial, "partial rotary embeddings")
    rope_base = c.require(rope.get("rope_theta", c.get("rope_theta")), "rope_theta (or rope_parameters.rope_theta)")

    n_embd = c.require(c.get("hidden_size"), "hidden_size")
    n_head = c.require(c.get("num_attention_heads"), "num_attention_heads")
    head_dim = c.get("head_dim")
    if head_dim is None:
        if n_embd % n_head:
            raise ConversionError(f"{path}: no head_dim, and hidden_size {n_embd} is not a multiple of "
                                  f"num_attention_heads {n_head}")
        head_dim = n_embd // n_head
    layer_ids = c.require(c.draft_get("target_layer_ids"), "target_layer_ids (in dflash_config or at the top level)")
    if not (isinstance(layer_ids, list) and layer_ids and all(isinstance(i, int) and i >= 0 for i in layer_ids)):
        c.refuse("target_layer_ids", layer_ids, "not a non-empty list of layer ids >= 0")
    scale = c.draft_get("input_embedding_scale")
    cfg = DrafterConfig(
        n_embd=n_embd, n_layer=c.require(c.get("num_hidden_layers"), "num_hidden_layers"), n_head=n_head,
        n_head_kv=c.get("num_key_value_heads") or n_head, head_dim=head_dim,
        n_ff=c.require(c.get("intermediate_size"), "intermediate_size"),
        n_vocab=c.require(c.get("vocab_size"), "vocab_size"), rms_eps=c.require(c.get("rms_norm_eps"), "rms_norm_eps"),
        rope_base=float(rope_base), target_layers=tuple(i + 1 for i in layer_ids),
        mask_token_id=c.require(c.draft_get("mask_token_id"), "mask_token_id (in dflash_config or at the top level)"),
        block_size=c.draft_get("block_size", 16), embedding_scale=None if scale is None else float(scale))
    result = HFDrafter(cfg, c.get("max_position_embeddings"), "mrope_section" in rope, c.get("num_target_layers"))
    if unknown := c.unknown():
        warnings.warn(f"{path}: ignoring fields unknown to this converter: {', '.join(unknown)}", stacklevel=2)
    return result


_DRAFTER_FILES = ["*.json", "*.safetensors", "*.pt"]


def resolve_source(src: Path | str, patterns: list[str] = _DRAFTER_FILES) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded (the files matching patterns) to the HF cache."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{src} is a file: pass the checkpoint folder (config.json + *.safetensors)")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        raise ConversionError(f"{src}: no such folder, and not a Hugging Face repo id (owner/name)")
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(str(src), allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ConversionError(f"{src}: no such repo on the Hugging Face Hub (or it is private: log in first)") from None
    except LocalEntryNotFoundError:
        raise ConversionError(f"{src}: no such local folder, not in the Hugging Face cache, and the Hub cannot be "
                              f"reached (offline, or HF_HUB_OFFLINE is set): download it when online, or pass a "
                              f"local folder") from None
    except Exception as e:  # network failures come in many types
        raise ConversionError(f"{src}: download from the Hugging Face Hub failed: {e}") from None


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files, without the optional `model.` prefix."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:  # safetensors reports corruption as assorted error types
            raise ConversionError(f"{f}: unreadable safetensors file ({e})") from None
        for name, t in part.items():
            name = name.removeprefix("model.")
            if name in tensors:
                raise ConversionError(f"{f}: tensor {name} appears in more than one file")
            tensors[name] = t
    return tensors


def convert_hf_to_gguf(src: Path | str, out: Path | str, target: Path | str | None, outtype: str = "f16",
                       *, progress: bool = False) -> Path:
    """Convert a Hugging Face DFlash drafter to a `dflash` GGUF for the target GGUF; nothing is written on failure."""
    if target is None:
        raise ConversionError("the target model's GGUF is required (--target TARGET.gguf): the drafter carries the "
                              "target's tokenizer and is checked against its shapes")
    folder = resolve_source(src)
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{config_path}: unreadable config ({e})") from None
    hf = parse_config(raw, config_path)
    if (folder / "mask_embedding.pt").exists():
        raise ConversionError(f"{folder / 'mask_embedding.pt'}: a separate mask-token embedding is not implemented")
    info = read_target(target)
    if hf.num_target_layers not in (None, info.n_layer):
        raise ConversionError(f"{config_path}: num_target_layers = {hf.num_target_layers}, but {info.path.name} has "
                              f"{info.n_layer} layers: this drafter was made for another target")
    return write_drafter_gguf(out, hf.cfg, load_tensors(folder), info, outtype, context_length=hf.context_length,
                              mrope=hf.mrope, name=Path(src).resolve().name, progress=progress)
