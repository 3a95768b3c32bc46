"""Target-only helpers over llama_cpp's low-level API, shared by the tests.

    quiet_logs()
    with load(path) as (model, ctx):
        prompt = tokenize(model, "The quick brown fox")
        out = greedy(ctx, model, prompt, 16)
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np

# Kept at module level: llama.cpp calls it for the life of the process.
_NO_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)


def quiet_logs() -> None:
    """Silence llama.cpp's logging for the rest of the process."""
    llama_cpp.llama_log_set(_NO_LOG, None)


# Context params under which llama.cpp's CPU backend computes in f32 throughout: its flash
# attention rounds Q/K/V to f16 and the default KV cache is f16.
EXACT = {"flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
         "type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}

_MODEL_FIELDS = {name for name, *_ in llama_cpp.llama_model_params._fields_}
_CTX_FIELDS = {name for name, *_ in llama_cpp.llama_context_params._fields_}


@contextmanager
def load(path: Path | str, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int = 512,
         **params: object) -> Iterator[tuple[llama_cpp.llama_model_p, llama_cpp.llama_context_p]]:
    """Load a GGUF model and a context on it; free both on exit.

    Extra keyword arguments set fields of `llama_model_params` or `llama_context_params` (their
    names do not overlap), e.g. `load(p, n_gpu_layers=0, n_rs_seq=4, **EXACT)`. Defaults that
    differ from llama.cpp's:
    - one thread: ggml's workers spin at every op barrier, so on a busy machine more threads make
      small models many times slower;
    - use_extra_bufts=False: the CPU backend's AMX weight repacking crashes (SIGSEGV in
      ggml_backend_amx_mul_mat) on quantized weights on AMX machines such as this one.
    """
    mparams = llama_cpp.llama_model_default_params()
    cparams = llama_cpp.llama_context_default_params()
    mparams.use_extra_bufts = False
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_ubatch
    cparams.n_threads = cparams.n_threads_batch = 1
    for key, val in params.items():
        # ctypes structures accept any attribute name: check it, or a typo would be ignored
        if key not in _MODEL_FIELDS | _CTX_FIELDS:
            raise TypeError(f"not a llama_model_params or llama_context_params field: {key}")
        setattr(mparams if key in _MODEL_FIELDS else cparams, key, val)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    try:
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        try:
            yield model, ctx
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)


def tokenize(model: llama_cpp.llama_model_p, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`; special-token text (e.g. "<s>") is parsed as text, not as a token."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 2))()  # at most one token per byte, plus BOS/EOS
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), add_bos, False)
    if n < 0:
        raise RuntimeError(f"llama_tokenize failed ({n})")
    return buf[:n]


def detokenize(model: llama_cpp.llama_model_p, tokens: list[int]) -> str:
    """Text of `tokens`, without BOS/EOS."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    buf = ctypes.create_string_buffer(16 * len(tokens) + 16)
    n = llama_cpp.llama_detokenize(vocab, arr, len(tokens), buf, len(buf), True, False)
    if n < 0:
        raise RuntimeError(f"llama_detokenize failed ({n})")
    return buf.raw[:n].decode(errors="replace")


def decode(ctx: llama_cpp.llama_context_p, tokens: list[int], pos: int,
           all_logits: bool = False) -> None:
    """Decode `tokens` of sequence 0 at positions pos, pos+1, ...; logits for the last token only,
    or for every token with `all_logits` (then len(tokens) must fit in one n_batch)."""
    n_batch = llama_cpp.llama_n_batch(ctx)
    if all_logits and len(tokens) > n_batch:
        raise ValueError(f"all_logits needs len(tokens) <= n_batch ({n_batch})")
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i] = tok, pos + start + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = all_logits or start + i == len(tokens) - 1
            if (rc := llama_cpp.llama_decode(ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
    finally:
        llama_cpp.llama_batch_free(batch)


def logits(ctx: llama_cpp.llama_context_p, model: llama_cpp.llama_model_p,
           i: int = -1) -> np.ndarray:
    """A copy of the logits of token `i` of the last decoded batch (-1: its last output)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise RuntimeError(f"no logits for output {i}")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def greedy(ctx: llama_cpp.llama_context_p, model: llama_cpp.llama_model_p, tokens: list[int],
           n: int, rows: list[np.ndarray] | None = None) -> list[int]:
    """The `n` tokens the target alone picks greedily after `tokens`, from an emptied memory; each step's logits
    are appended to `rows` if given.

    Does not stop at end-of-generation tokens, so the result is always `n` long.
    """
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    out: list[int] = []
    decode(ctx, tokens, 0)
    for step in range(n):
        row = logits(ctx, model)
        if rows is not None:
            rows.append(row)
        out.append(int(np.argmax(row)))
        if step < n - 1:
            decode(ctx, out[-1:], len(tokens) + step)
    return out
