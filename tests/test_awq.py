"""`dflash convert target`: AutoAWQ GEMM checkpoints -> target GGUFs (issue 29).

Exactness of the Q4_1 blocks against AWQ's own dequantization, llama.cpp against a float64 reference forward of
the converted file, lossless `dflash run` with a drafter, and the refusals.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import target_reference
from awq_checkpoints import SPECIAL, SPECS, awq_pack, quantization_config, write_awq_checkpoint
from llama_helpers import EXACT, decode, load, logits, tokenize
from synthetic_drafters import random_drafter_gguf

from dflash_local.cli import app
from dflash_local.convert import awq
from dflash_local.convert.awq_target import convert_awq_target
from dflash_local.convert.gguf_target import ConversionError

MODELS = tuple(SPECS)  # llama, llama with Llama 3.1's RoPE scaling, qwen2, qwen3
PROMPT = "the fox and the dog was in the little"
# max |logit difference| / max |logit|, llama.cpp against the float64 reference forward of the same GGUF. llama.cpp's
# CPU matmul rounds the activations to 8-bit blocks (Q8_1) against Q4_1 weights, to f16 against f16 weights: measured
# 0.034 (llama3) to 0.075 (llama) for q4_1, 0.0010 to 0.0040 for f16 (f32 weights: 1e-4, test_targets). Layout
# mistakes are far outside: llama's Q/K unpermuted 1.1, nibbles in plain order 1.6, llama3 without rope_freqs 0.52.
LOGIT_TOLERANCE = {"q4_1": 0.15, "f16": 0.01}
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """model (a SPECS name) -> (folder, layers) of a random AWQ checkpoint, written once per module."""
    root, cache = tmp_path_factory.mktemp("awq"), {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = write_awq_checkpoint(root / arch, arch)
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """(model, outtype) -> converted GGUF; the warnings of each conversion in get.warnings[arch, outtype]."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(arch: str, outtype: str = "q4_1") -> Path:
        if (arch, outtype) not in cache:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cache[arch, outtype] = convert_awq_target(checkpoint(arch)[0], root / f"{arch}-{outtype}.gguf", outtype)
            get.warnings[arch, outtype] = [str(w.message) for w in caught]
        return cache[arch, outtype]
    get.warnings = {}
    return get


def _gguf_weights(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """GGUF name -> (type, float64 values in HF's row order: llama's Q/K unpermuted)."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    heads = {"attn_q": reader.fields[f"{arch}.attention.head_count"].contents(),
             "attn_k": reader.fields[f"{arch}.attention.head_count_kv"].contents()}
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        if arch == "llama" and (n := heads.get(t.name.split(".")[-2])) is not None and t.name.endswith(".weight"):
            w = target_reference._unpermute(torch.from_numpy(w), n).numpy()
        out[t.name] = (t.tensor_type, w)
    return out


def _gguf_name(hf: str) -> str:
    _, _, i, module = hf.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[module]}.weight"


def test_unpack_inverts_autoawq_packing():
    codes = torch.randint(0, 16, (64, 96), generator=torch.Generator().manual_seed(1))
    assert np.array_equal(awq.unpack(awq_pack(codes).numpy()), codes.numpy())
    # columns 0..7 hold their own index: nibble i (bits 4i..4i+3) holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7]
    assert awq_pack(torch.arange(8)[None]).item() == np.int32(np.uint32(0x75316420).view(np.int32))


@pytest.mark.parametrize("arch", MODELS)
def test_q4_1_blocks_are_awq_weights(arch, checkpoint, converted):
    """Every block dequantizes to AWQ's (q - z) * s within the float16 rounding of m = -z * s (d = s is exact)."""
    _, layers = checkpoint(arch)
    weights = _gguf_weights(converted(arch))
    for hf, layer in layers.items():
        qtype, got = weights[_gguf_name(hf)]
        assert qtype == gguf.GGMLQuantizationType.Q4_1, hf
        bound = 2.0**-11 * np.abs(layer.offset) + 1e-7 * np.abs(layer.weight).max()
        assert (np.abs(got - layer.weight) <= bound).all(), hf
    n_linear = sum(t == gguf.GGMLQuantizationType.Q4_1 for t, _ in weights.values())
    assert n_linear == len(layers) == 7 * SPECS[arch].n_layer
    assert ("output.weight" in weights) != SPECS[arch].tied


@pytest.mark.parametrize("arch", MODELS)
def test_f16_outtype_dequantizes(arch, checkpoint, converted):
    _, layers = checkpoint(arch)
    weights = _gguf_weights(converted(arch, "f16"))
    for hf, layer in layers.items():
        qtype, got = weights[_gguf_name(hf)]
        assert qtype == gguf.GGMLQuantizationType.F16
        np.testing.assert_array_equal(got, layer.weight.astype(np.float16))


@pytest.mark.parametrize("outtype", LOGIT_TOLERANCE)
@pytest.mark.parametrize("arch", MODELS)
def test_llama_cpp_matches_the_reference_forward(arch, outtype, converted):
    path = converted(arch, outtype)
    with load(path, **EXACT) as (model, ctx):
        tokens = tokenize(model, PROMPT, add_bos=False)
        decode(ctx, tokens, 0, all_logits=True)
        got = np.stack([logits(ctx, model, i) for i in range(len(tokens))])
    want = target_reference.logits(path, tokens)
    assert np.abs(got - want).max() / np.abs(want).max() < LOGIT_TOLERANCE[outtype]
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9  # llama: one near tie of 11 flips


def _run(*args: object):
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.mark.parametrize("arch", MODELS)
def test_run_with_a_drafter_is_the_target_alone(arch, converted, tmp_path):
    target = converted(arch)
    drafter = random_drafter_gguf(target, tmp_path / "drafter.gguf")
    common = ("-p", PROMPT, "--no-chat-template", "--temp", "0", "-n", "24", "-t", "1")
    alone = _run(target, "--no-draft", *common)
    drafted = _run(target, "--drafter", drafter, *common)
    assert alone.exit_code == 0, alone.output
    assert drafted.exit_code == 0, drafted.output
    assert alone.stdout.strip() and alone.stdout == drafted.stdout


@pytest.mark.parametrize("arch", MODELS)
def test_tokenizer_carried_over(arch, converted):
    """The BPE vocabulary and merges, the special token, and a warning where the pre-tokenizer is a guess."""
    reader = gguf.GGUFReader(converted(arch))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2" and len(tokens) == len(field("tokenizer.ggml.token_type"))
    assert tokens[field("tokenizer.ggml.eos_token_id")] == SPECIAL and tokens[-1].startswith("[PAD")
    types = dict(zip(tokens, field("tokenizer.ggml.token_type")))
    assert types[SPECIAL] == gguf.TokenType.CONTROL and types["<tool_call>"] == gguf.TokenType.USER_DEFINED
    assert "Ġ t" in field("tokenizer.ggml.merges")
    guessed = [m for m in converted.warnings[arch, "q4_1"] if "pre-tokenizer assumed" in m]
    assert len(guessed) == (SPECS[arch].arch == "llama")


def test_llama3_rope_factors(converted):
    """rope_freqs (llama.cpp divides each frequency by its factor) against transformers' llama3 inverse frequencies,
    written as transformers computes them."""
    spec, r = SPECS["llama3"], SPECS["llama3"].rope_scaling
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim)
    old_ctx, factor = r["original_max_position_embeddings"], r["factor"]
    low_wavelen, high_wavelen = old_ctx / r["low_freq_factor"], old_ctx / r["high_freq_factor"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    want = torch.where(medium, smoothed, scaled)
    freqs = {t.name: t for t in gguf.GGUFReader(converted("llama3")).tensors}["rope_freqs.weight"]
    factors = torch.from_numpy(freqs.data.astype(np.float64))
    torch.testing.assert_close(inv_freq / factors, want, rtol=1e-6, atol=0)
    assert {1.0, factor} < set(factors.tolist())  # all three kinds of dimensions


def test_cli_converts(checkpoint, tmp_path):
    out = tmp_path / "t.gguf"
    result = CliRunner().invoke(app, ["convert", "target", str(checkpoint("qwen2")[0]), "--to", "gguf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and f"wrote {out}" in result.stderr


REFUSALS = [  # config change -> what the error names
    ({"quantization_config": quantization_config(32, version="gemv")}, "quantization_config.version"),
    ({"quantization_config": quantization_config(32, bits=8)}, "quantization_config.bits"),
    ({"quantization_config": {"quant_method": "awq", "w_bit": 3, "q_group_size": 32, "version": "GEMM"}},
     "quantization_config.w_bit"),
    ({"quantization_config": quantization_config(48)}, "quantization_config.group_size"),
    ({"quantization_config": quantization_config(32, quant_method="gptq")}, "quantization_config.quant_method"),
    ({"quantization_config": None}, "no quantization_config"),
    ({"quantization_config": quantization_config(32, zero_point=False)}, "quantization_config.zero_point"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type = 'mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling of type 'llama3'"),  # qwen2's
]


@pytest.mark.parametrize("change,named", REFUSALS, ids=[n for _, n in REFUSALS])
def test_refusals(change, named, checkpoint, tmp_path):
    src = shutil.copytree(checkpoint("qwen2")[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        convert_awq_target(src, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf"))
    result = CliRunner().invoke(app, ["convert", "target", str(src), "--to", "gguf", "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code == 1 and "error:" in result.stderr and named in result.stderr


def _edit_tensors(src: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


TENSOR_REFUSALS = {  # an edit of the checkpoint's tensors -> what the error says
    "transposed": (lambda t: t.update({UP: t[UP].T.contiguous()}), "up_proj.qweight has shape"),  # GEMV-like
    "missing": (lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"), "missing tensors .*blk.1.ffn_norm"),
    "partial": (lambda t: t.pop("model.layers.0.mlp.up_proj.scales"), "a partial or unknown quantized layer"),
    "unknown": (lambda t: t.update({"model.extra.weight": t["model.norm.weight"].clone()}), "not part of a qwen2"),
    "vocabulary": (lambda t: t.update({EMBD: t[EMBD][:-1].clone()}), "embedding has 318 rows, but vocab_size is 319"),
}
EMBD = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.qweight"


@pytest.mark.parametrize("case", TENSOR_REFUSALS)
def test_tensor_refusals(case, checkpoint, tmp_path):
    src = shutil.copytree(checkpoint("qwen2")[0], tmp_path / "src")
    edit, message = TENSOR_REFUSALS[case]
    _edit_tensors(src, edit)
    with pytest.raises(ConversionError, match=message):
        convert_awq_target(src, tmp_path / "out.gguf")


def test_older_autoawq_configs(checkpoint, converted, tmp_path):
    """AutoAWQ's older field names (w_bit, q_group_size, version GEMM), in config.json or in quant_config.json."""
    old = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    src = shutil.copytree(checkpoint("qwen2")[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    want = [t.data.tobytes() for t in gguf.GGUFReader(converted("qwen2")).tensors]
    for where, in_config in (("config.json", {"quant_method": "awq", **old}), ("quant_config.json", None)):
        (src / "config.json").write_text(json.dumps(config | {"quantization_config": in_config}))
        (src / "quant_config.json").write_text(json.dumps(old))
        out = convert_awq_target(src, tmp_path / f"{where}.gguf")
        assert [t.data.tobytes() for t in gguf.GGUFReader(out).tensors] == want, where


def test_refuses_a_missing_tokenizer(checkpoint, tmp_path):
    src = shutil.copytree(checkpoint("qwen2")[0], tmp_path / "src")
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer this converter reads"):
        convert_awq_target(src, tmp_path / "out.gguf")
    if importlib.util.find_spec("sentencepiece") is None:  # not a dependency
        (src / "tokenizer.model").write_bytes(b"")
        with pytest.raises(ConversionError, match="sentencepiece is not installed"):
            convert_awq_target(src, tmp_path / "out.gguf")


def test_hub_id_downloads_weights_and_tokenizer(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(checkpoint("qwen3")[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert_awq_target("someone/tiny-awq", tmp_path / "out.gguf")
    assert asked["repo_id"] == "someone/tiny-awq"
    assert {"*.safetensors", "*.json", "tokenizer.model"} <= set(asked["patterns"])
    assert gguf.GGUFReader(tmp_path / "out.gguf").fields["general.name"].contents() == "someone/tiny-awq"
