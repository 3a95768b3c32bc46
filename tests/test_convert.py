"""`dflash convert drafter`: HF -> GGUF that libllama loads, round trips, refusals, the CLI."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import llama_cpp
import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_drafters import random_drafter_gguf, write_hf_drafter
from typer.testing import CliRunner

from dflash_local.cli import app
from dflash_local.convert.gguf_io import load_drafter_gguf, save_drafter_gguf, target_embeddings
from dflash_local.convert.gguf_target import ConversionError, read_gguf, read_target
from dflash_local.convert.hf import convert_hf_to_gguf, parse_config
from dflash_local.reference import Drafter

# a drafter for SmolLM2-135M (hidden 576, head_dim 64, 30 layers, 49152 tokens), kept small
SMOL = dict(n_embd=576, n_layer=2, n_head=3, n_head_kv=1, head_dim=64, n_ff=64, vocab_size=49152,
            target_layer_ids=[0, 14, 28], mask_token_id=49151)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_drafter(tmp_path_factory.mktemp("hf") / "smol-drafter", **SMOL)


@pytest.fixture(scope="module")
def converted(hf_dir, smollm2_path, tmp_path_factory):
    """outtype -> converted GGUF, each converted once per module."""
    out_dir, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(outtype: str) -> Path:
        if outtype not in cache:
            cache[outtype] = convert_hf_to_gguf(hf_dir, out_dir / f"drafter-{outtype}.gguf", smollm2_path, outtype)
        return cache[outtype]
    return get


@pytest.fixture(scope="module")
def original(hf_dir, smollm2_path) -> Drafter:
    """The checkpoint of hf_dir as a reference drafter, straight from Hugging Face format."""
    cfg = parse_config(json.loads((hf_dir / "config.json").read_text())).cfg
    drafter = Drafter(cfg, *target_embeddings(smollm2_path))
    drafter.load_state_dict(load_file(hf_dir / "model.safetensors"))
    return drafter


@contextmanager
def llama_model(path: Path) -> Iterator[ctypes.c_void_p]:
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"libllama could not load {path}"
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    return buf.value.decode() if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) >= 0 else None


def test_libllama_loads_converted(converted, smollm2_path):
    path = converted("f16")
    with llama_model(path) as model:
        assert meta(model, "general.architecture") == "dflash"
        assert meta(model, "dflash.block_size") == "16"
        assert meta(model, "dflash.attention.causal") == "false"
        assert meta(model, "tokenizer.ggml.mask_token_id") == "49151"
        assert llama_cpp.llama_model_n_layer(model) == 2
        assert llama_cpp.llama_model_rope_type(model) == llama_cpp.LLAMA_ROPE_TYPE_NEOX
    r = read_gguf(path)
    layers = r.fields["dflash.target_layers"]
    assert layers.contents() == [1, 15, 29] and layers.types[-1].name == "INT32"  # HF ids + 1
    target = read_gguf(smollm2_path)
    tokenizer = [k for k in target.fields if k.startswith("tokenizer.")]
    assert all(r.fields[k].contents() == target.fields[k].contents() for k in tokenizer)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["fc.weight"] == "F16" and types["blk.1.attn_k_norm.weight"] == "F32"
    assert "token_embd.weight" not in types and "output.weight" not in types


# outtype -> (relative tolerance of the matrices, of the logits)
TOLERANCE = {"f32": (0, 1e-5), "f16": (1e-3, 1e-2), "bf16": (8e-3, 5e-2), "q8_0": (None, 5e-2)}


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_round_trip(converted, original, smollm2_path, outtype):
    loaded = load_drafter_gguf(converted(outtype), smollm2_path)
    tol, logit_tol = TOLERANCE[outtype]
    state = loaded.state_dict()
    for name, want in original.state_dict().items():
        got = state[name]
        if want.ndim == 1 or outtype == "f32":
            assert torch.equal(got, want), name  # norms are always f32
        elif outtype == "q8_0":  # per block of 32: d = max|w| / 127 stored as f16; error <= d/2 + 127 d 2^-11
            blocks = want.reshape(-1, 32)
            bound = blocks.abs().amax(1, keepdim=True) / 127 * 0.6
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), name
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert loaded.cfg == dataclasses.replace(original.cfg, rms_eps=loaded.cfg.rms_eps)  # stored as f32
    assert loaded.cfg.rms_eps == pytest.approx(original.cfg.rms_eps, rel=1e-6)
    features = torch.randn(9, original.cfg.n_extract * original.cfg.n_embd, generator=torch.Generator().manual_seed(0))
    block = torch.tensor([42] + [49151] * 15)
    want = original(features, block)
    torch.testing.assert_close(loaded(features, block), want, rtol=logit_tol, atol=logit_tol * want.abs().max().item())


def test_save_drafter_gguf_round_trip(converted, smollm2_path, tmp_path):
    drafter = load_drafter_gguf(converted("f32"), smollm2_path)
    out = save_drafter_gguf(drafter, tmp_path / "saved.gguf", smollm2_path, "f32")
    again = load_drafter_gguf(out, smollm2_path, dtype=torch.float64)
    assert again.cfg == drafter.cfg
    state = again.state_dict()
    assert all(torch.equal(v.double(), state[k]) for k, v in drafter.state_dict().items())
    assert torch.equal(again.lm_head, again.tok_embd)  # SmolLM2 ties its output head to the embedding
    with llama_model(out) as model:
        assert meta(model, "general.architecture") == "dflash"


def test_mrope_drafter(smollm2_path, tmp_path):
    src = write_hf_drafter(tmp_path / "mrope", **{**SMOL, "n_layer": 1, "mrope": True})
    out = convert_hf_to_gguf(src, tmp_path / "mrope.gguf", smollm2_path, "f16")
    with llama_model(out) as model:  # sections [head_dim/2, 0, 0, 0]: llama.cpp ropes it as M-RoPE
        assert llama_cpp.llama_model_rope_type(model) == llama_cpp.LLAMA_ROPE_TYPE_MROPE
        assert meta(model, "dflash.rope.freq_base") == "10000000.000000"  # from rope_parameters


def test_config_variants(hf_dir, smollm2_path, tmp_path):
    raw = json.loads((hf_dir / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field of a z-lab style config is understood
        zlab = parse_config(raw).cfg
    moved = ("dflash_config", "rope_theta", "head_dim", "num_key_value_heads")
    variant = {k: v for k, v in raw.items() if k not in moved}
    variant |= raw["dflash_config"] | {"rope_parameters": {"rope_type": "default", "rope_theta": raw["rope_theta"]},
                                       "num_attention_heads": 9, "num_key_value_heads": 3, "input_embedding_scale": 2.0}
    parsed = parse_config(variant).cfg  # top-level DFlash fields, rope_parameters, head_dim from hidden / heads
    assert parsed.target_layers == zlab.target_layers == (1, 15, 29)
    assert (parsed.mask_token_id, parsed.block_size, parsed.rope_base) == (zlab.mask_token_id, 16, zlab.rope_base)
    assert (parsed.head_dim, parsed.n_head, parsed.n_head_kv, parsed.embedding_scale) == (64, 9, 3, 2.0)
    src = shutil.copytree(hf_dir, tmp_path / "scaled")
    (src / "config.json").write_text(json.dumps(raw | {"input_embedding_scale": 2.0, "block_size": 8}))
    with llama_model(convert_hf_to_gguf(src, tmp_path / "scaled.gguf", smollm2_path, "q8_0")) as model:
        assert meta(model, "dflash.embedding_scale") == "2.000000"
        assert meta(model, "dflash.block_size") == "16"  # dflash_config wins over the top level, as in z-lab's code
    with pytest.warns(UserWarning, match="mystery_knob"):
        parse_config(raw | {"mystery_knob": 1})


def test_random_drafter_gguf(smollm2_path, tmp_path):
    out = random_drafter_gguf(smollm2_path, tmp_path / "random.gguf", n_layer=1, outtype="q8_0")
    with llama_model(out) as model:
        assert meta(model, "dflash.embedding_length") == "576"
    assert read_target(smollm2_path).n_layer == 30


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_tiny_targets(tiny_target, tmp_path, arch):
    target = tiny_target(arch)
    out = random_drafter_gguf(target, tmp_path / "d.gguf", n_layer=2)
    with llama_model(out) as model:  # an M-RoPE target (qwen35) makes the drafter M-RoPE too
        mrope = llama_cpp.llama_model_rope_type(model) == llama_cpp.LLAMA_ROPE_TYPE_MROPE
    assert mrope == (arch == "qwen35")
    drafter = load_drafter_gguf(out, target)
    embd, head = target_embeddings(target)
    assert torch.equal(drafter.tok_embd, embd) and torch.equal(drafter.lm_head, head)
    assert not torch.equal(head, embd)  # both tiny targets have an untied output.weight


def _edit_config(**changes):
    def edit(src: Path) -> None:
        raw = json.loads((src / "config.json").read_text())
        for key, value in changes.items():
            where = raw["dflash_config"] if key in raw["dflash_config"] else raw
            if value is None:
                where.pop(key)
            else:
                where[key] = value
        (src / "config.json").write_text(json.dumps(raw))
    return edit


def _edit_tensors(change):
    def edit(src: Path) -> None:
        tensors = load_file(src / "model.safetensors")
        change(tensors)
        save_file(tensors, src / "model.safetensors")
    return edit


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors["fc.weight"][0, 0] = float("nan")


def _corrupt(src: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


BAD_INPUTS = {  # name -> (edit of a good checkpoint, words of the expected message)
    "missing field": (_edit_config(hidden_size=None), "hidden_size"),
    "missing layer ids": (_edit_config(target_layer_ids=None), "target_layer_ids"),
    "wrong shape": (_edit_tensors(lambda t: t.update({"layers.0.mlp.up_proj.weight": torch.zeros(65, 576)})),
                    "layers.0.mlp.up_proj.weight has shape [65, 576]"),
    "missing tensor": (_edit_tensors(lambda t: t.pop("norm.weight")), "missing tensors: norm.weight"),
    "unexpected tensor": (_edit_tensors(lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})), "lm_head.weight"),
    "nan": (_edit_tensors(_nan), "NaN"),
    "last target layer": (_edit_config(target_layer_ids=[0, 29]), "[29] are beyond the target"),
    "corrupt safetensors": (_corrupt, "unreadable safetensors"),
    "mask beyond vocab": (_edit_config(mask_token_id=49152), "mask_token_id 49152"),
    "other target depth": (_edit_config(num_target_layers=36), "num_target_layers"),
    "other vocabulary": (_edit_config(vocab_size=50000), "vocabulary size 50000"),
    "sliding window": (_edit_config(use_sliding_window=True, sliding_window=512), "use_sliding_window"),
    "sliding layers": (_edit_config(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    "partial rope": (_edit_config(partial_rotary_factor=0.25), "partial_rotary_factor"),
    "rope scaling": (_edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    "interleaved rope": (_edit_config(rope_is_neox_style=False), "rope_is_neox_style"),
    "output multiplier": (_edit_config(output_multiplier=0.5), "output_multiplier"),
    "softcapping": (_edit_config(final_logit_softcapping=30.0), "final_logit_softcapping"),
    "value scale": (_edit_config(attention_value_scale=0.5), "attention_value_scale"),
    "gelu": (_edit_config(hidden_act="gelu"), "hidden_act"),
    "dflash2": (_edit_config(conv_kernel_size=2), "conv_kernel_size"),
    "mask embedding": (lambda src: (src / "mask_embedding.pt").write_bytes(b""), "mask_embedding.pt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(hf_dir, smollm2_path, tmp_path, case):
    edit, words = BAD_INPUTS[case]
    src = shutil.copytree(hf_dir, tmp_path / "src")
    edit(src)
    with pytest.raises(ConversionError) as err:
        convert_hf_to_gguf(src, tmp_path / "out" / "d.gguf", smollm2_path, "f16")
    assert words in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_other_hidden_size_fails(smollm2_path, tmp_path):
    src = write_hf_drafter(tmp_path / "src", **{**SMOL, "n_embd": 128, "n_head": 2})
    with pytest.raises(ConversionError, match="hidden size 128 differs from the target's"):
        convert_hf_to_gguf(src, tmp_path / "d.gguf", smollm2_path)
    assert not (tmp_path / "d.gguf").exists()


def test_missing_target_fails(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match="--target"):
        convert_hf_to_gguf(hf_dir, tmp_path / "d.gguf", None)
    assert not list(tmp_path.iterdir())


def test_hub_id_offline_fails(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "z-lab/no-such-drafter-for-tests"
    with pytest.raises(ConversionError, match="offline") as err:
        convert_hf_to_gguf(repo, tmp_path / "d.gguf", smollm2_path)
    assert repo in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key, value", [("attention.sliding_window", 512), ("conv_kernel_size", 2),
                                        ("hidden_activation", "gelu")])
def test_load_refuses_unsupported_gguf(smollm2_path, tmp_path, key, value):
    w = gguf.GGUFWriter(tmp_path / "upstream.gguf", arch="dflash")
    w.add_key_value(f"dflash.{key}", value, gguf.GGUFValueType.get_type(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(ConversionError, match=f"dflash.{key} = "):
        load_drafter_gguf(tmp_path / "upstream.gguf", smollm2_path)


def test_gguf_roles_are_checked(converted, smollm2_path):
    with pytest.raises(ConversionError, match="architecture 'llama', expected 'dflash'"):
        load_drafter_gguf(smollm2_path, smollm2_path)
    with pytest.raises(ConversionError, match="is a dflash drafter, not a target model"):
        load_drafter_gguf(converted("f16"), converted("f16"))


def test_cli(hf_dir, smollm2_path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.gguf"
    ok = runner.invoke(app, ["convert", "drafter", str(hf_dir), "--to", "gguf", "--target", str(smollm2_path),
                             "-o", str(out), "--outtype", "q8_0"])
    assert ok.exit_code == 0, ok.output
    assert out.exists() and "wrote" in ok.output
    missing = runner.invoke(app, ["convert", "drafter", str(hf_dir), "--to", "gguf", "-o", str(tmp_path / "x.gguf")])
    assert missing.exit_code == 2 and "--target" in missing.output and "Traceback" not in missing.output
    bad = shutil.copytree(hf_dir, tmp_path / "bad")
    _edit_config(target_layer_ids=[40])(bad)
    failed = runner.invoke(app, ["convert", "drafter", str(bad), "--to", "gguf", "--target", str(smollm2_path),
                                 "-o", str(tmp_path / "y.gguf")])
    assert failed.exit_code == 1 and "error: target_layer_ids [40]" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out.gguf"]
