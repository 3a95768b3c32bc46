"""Random-weight targets of every supported architecture (llama, qwen2, qwen3, gemma3, qwen35), as llama.cpp's
converters lay them out: float32 for the tests' tiny models, or random quantized blocks (llama.cpp's Q4_K_M mix, or
Q8_0) for full-size ones.

Weights are deterministic for a seed and scaled so that greedy output depends on the context and does not collapse
into one repeated token (measured on the tiny models over seeds and prompts): embeddings enter the residual stream at
std 0.1, well below the unit-scale sub-layer updates, so the context rather than the current token drives the
prediction; Q and K are 3x unit scale (`qk_gain`), so attention is sharp instead of averaging the context into one
slowly moving vector; logits get a std of ~4, peaked enough for structure, not one-hot. Sharp attention amplifies
rounding through many layers, though: at 36 layers a pass of 16 tokens gave logits up to 5.7 away from one-token
passes' (one CPU thread, Q4_K_M), against 0.47-0.55 at a gain of 1.5, so deep shapes take the lower gain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from dflash_local.synthetic.vocab import N_BASE, add_tokenizer
from dflash_local.synthetic.weights import OnBytes, Q, Spec, TensorWriter, matrix, norm, vector

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen35")
ROPE_BASE = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6, "qwen35": 1e7}
# gemma3: even layers slide over a 32-token window, odd layers attend globally.
GEMMA3_SWA = {"sliding_window": 32, "sliding_window_pattern": 2}
EMBD_STD = 0.1
QK_GAIN = 3.0


@dataclass(frozen=True)
class Ssm:
    """qwen35's Gated DeltaNet layers in GGUF terms: state_size is the head size, group_count and time_step_rank the
    key and value heads (more value heads than key heads, as in the real models)."""

    conv_kernel: int = 4
    state_size: int = 16
    group_count: int = 2
    time_step_rank: int = 4
    # the short convolution's scale. A layer's output is RMSNorm(S q) * silu(z): with q and k nearly orthogonal (random
    # unit vectors, q.k ~ 1/sqrt(state_size)), S q is a few past values times small coefficients of either sign that
    # can cancel, and the norm blows the remainder up to unit scale, so rounding in q or k moves the output a lot (in
    # float64, a layer's relative output change is 1.9x its input's, 1.4x an FFN's; |S q| ranges from 5e-3 down to
    # 2e-4). Larger convolution outputs give silu's outputs a larger positive mean, so every q and k share a direction
    # (q.k ~ 0.3), and S q stays clear of zero: at 3, 1.5x and |S q| 3.5e-2 down to 5e-4
    conv_gain: float = 1.0

    @property
    def inner_size(self) -> int:
        return self.state_size * self.time_step_rank


@dataclass(frozen=True)
class TargetShape:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int = N_BASE
    tied: bool = False  # no output.weight: the embedding is the LM head
    context_length: int = 2048
    rope_base: float | None = None  # None: ROPE_BASE of the arch
    ssm: Ssm = field(default_factory=Ssm)  # qwen35 only
    full_attention_interval: int = 4  # qwen35: layers il with (il + 1) % interval == 0 attend, the others are SSM
    qk_gain: float = QK_GAIN  # Q and K's scale

    def is_attention(self, il: int) -> bool:
        return self.arch != "qwen35" or (il + 1) % self.full_attention_interval == 0

    @property
    def n_rot(self) -> int:
        return self.head_dim // 4 if self.arch == "qwen35" else self.head_dim  # qwen35 ropes a quarter of the head


def write_target(path: Path, shape: TargetShape, *, name: str, seed: int = 0, quant: str | None = None,
                 chat_template: str | None = None, progress: bool = False, on_bytes: OnBytes | None = None) -> Path:
    """Write a random target of `shape` to path: float32, or random blocks typed as in `quant` (one of QUANTS).
    progress: a bar on stderr; on_bytes: TensorWriter.write's."""
    if shape.arch not in ARCHS:
        raise ValueError(f"unknown arch {shape.arch!r}; expected one of {ARCHS}")
    if shape.arch in ("llama", "qwen2") and shape.head_dim * shape.n_head != shape.n_embd:
        raise ValueError(f"{shape.arch} needs head_dim * n_head == n_embd")
    arch = shape.arch
    w = gguf.GGUFWriter(None, arch)
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", int(QUANTS[quant][0] if quant else gguf.LlamaFileType.ALL_F32))
    for key, val in {
        "context_length": shape.context_length, "embedding_length": shape.n_embd, "block_count": shape.n_layer,
        "feed_forward_length": shape.n_ff, "attention.head_count": shape.n_head,
        "attention.head_count_kv": shape.n_head_kv, "attention.key_length": shape.head_dim,
        "attention.value_length": shape.head_dim, "rope.dimension_count": shape.n_rot,
    }.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", shape.rope_base or ROPE_BASE[arch])
    if arch == "gemma3":
        for key, val in GEMMA3_SWA.items():
            w.add_uint32(f"gemma3.attention.{key}", val)
        w.add_float32("gemma3.rope.freq_base_swa", 10000.0)
    if arch == "qwen35":
        s = shape.ssm
        for key, val in (("conv_kernel", s.conv_kernel), ("state_size", s.state_size),
                         ("group_count", s.group_count), ("time_step_rank", s.time_step_rank)):
            w.add_uint32(f"qwen35.ssm.{key}", val)
        w.add_uint32("qwen35.ssm.inner_size", s.inner_size)
        w.add_uint32("qwen35.full_attention_interval", shape.full_attention_interval)
        half = shape.n_rot // 2  # text-only M-RoPE: every section sees the same position
        w.add_array("qwen35.rope.dimension_sections", [half - 2 * (half // 3), half // 3, half // 3, 0])
    add_tokenizer(w, shape.n_vocab, chat_template)

    rng = np.random.default_rng([seed, ARCHS.index(arch)])
    tw = TensorWriter(w, rng, QUANTS[quant][1](shape) if quant else None)
    for spec in tensors(shape):
        tw.add(spec)
    return tw.write(Path(path), progress, on_bytes)


def tensors(shape: TargetShape) -> Iterator[Spec]:
    """Every tensor of the target, in the order they are drawn."""
    n_embd = shape.n_embd
    # gemma3 multiplies embeddings by sqrt(n_embd) before the first layer
    embd_std = EMBD_STD / n_embd**0.5 if shape.arch == "gemma3" else EMBD_STD
    yield matrix("token_embd.weight", shape.n_vocab, n_embd, std=embd_std)
    # logits' spread: from the output matrix, or for tied embeddings from the final norm's scale
    yield norm("output_norm.weight", n_embd, scale=4.0 / (embd_std * n_embd**0.5) if shape.tied else 1.0)
    if not shape.tied:
        yield matrix("output.weight", shape.n_vocab, n_embd, std=4.0 / n_embd**0.5)
    for il in range(shape.n_layer):
        yield from _layer(shape, f"blk.{il}.", il)


def _layer(shape: TargetShape, p: str, il: int) -> Iterator[Spec]:
    arch, n_embd, hd = shape.arch, shape.n_embd, shape.head_dim
    yield norm(p + "attn_norm.weight", n_embd)
    if not shape.is_attention(il):
        yield from _gated_delta_net(shape, p)
    else:
        # qwen35 attention projects a sigmoid output gate together with Q
        n_q = shape.n_head * hd * (2 if arch == "qwen35" else 1)
        n_kv = shape.n_head_kv * hd
        qk_norm = arch in ("qwen3", "gemma3", "qwen35")
        qk_std = n_embd**-0.5 * (1.0 if qk_norm else shape.qk_gain)
        yield matrix(p + "attn_q.weight", n_q, n_embd, std=qk_std)
        yield matrix(p + "attn_k.weight", n_kv, n_embd, std=qk_std)
        yield matrix(p + "attn_v.weight", n_kv, n_embd)
        yield matrix(p + "attn_output.weight", n_embd, shape.n_head * hd)
        if arch == "qwen2":
            for name, n in (("attn_q.bias", n_q), ("attn_k.bias", n_kv), ("attn_v.bias", n_kv)):
                yield vector(p + name, n, lambda rng, n=n: rng.normal(0.0, 0.1, n))
        if qk_norm:
            yield norm(p + "attn_q_norm.weight", hd, scale=shape.qk_gain)
            yield norm(p + "attn_k_norm.weight", hd, scale=shape.qk_gain)
    if arch in ("gemma3", "qwen35"):
        yield norm(p + "post_attention_norm.weight", n_embd)
    if arch != "qwen35":  # qwen35 feeds post_attention_norm's output to the FFN
        yield norm(p + "ffn_norm.weight", n_embd)
    yield matrix(p + "ffn_gate.weight", shape.n_ff, n_embd)
    yield matrix(p + "ffn_up.weight", shape.n_ff, n_embd)
    yield matrix(p + "ffn_down.weight", n_embd, shape.n_ff)
    if arch == "gemma3":
        yield norm(p + "post_ffw_norm.weight", n_embd)


def _gated_delta_net(shape: TargetShape, p: str) -> Iterator[Spec]:
    """Tensors of a qwen35 linear-attention layer, as the llama.cpp converter lays them out."""
    s, n_embd = shape.ssm, shape.n_embd
    key_dim, value_dim = s.state_size * s.group_count, s.inner_size
    conv_dim = 2 * key_dim + value_dim
    n_v = s.time_step_rank
    yield matrix(p + "attn_qkv.weight", conv_dim, n_embd)
    yield matrix(p + "attn_gate.weight", value_dim, n_embd)
    yield Spec(p + "ssm_conv1d.weight", (conv_dim, s.conv_kernel),
               lambda rng: rng.normal(0.0, s.conv_gain * s.conv_kernel**-0.5, (conv_dim, s.conv_kernel)))  # float32 too
    yield vector(p + "ssm_dt.bias", n_v, lambda rng: rng.normal(0.0, 0.5, n_v))
    # the converter stores -exp(A_log): negative, so the state decays
    yield vector(p + "ssm_a", n_v, lambda rng: -np.exp(rng.uniform(-1.0, 1.0, n_v)))
    yield matrix(p + "ssm_beta.weight", n_v, n_embd)
    yield matrix(p + "ssm_alpha.weight", n_v, n_embd)
    yield norm(p + "ssm_norm.weight", s.state_size)
    yield matrix(p + "ssm_out.weight", n_embd, value_dim)


def _q4_k_m(shape: TargetShape):
    """llama.cpp's Q4_K_M mix, roughly (llama_tensor_get_type): Q6_K for the output head and for attn_v and ffn_down
    in the layers use_more_bits picks (the first and last eighth, every third between), Q4_K for the rest."""
    attn_layers = [il for il in range(shape.n_layer) if shape.is_attention(il)]

    def more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def qtype(spec: Spec) -> Q:
        parts = spec.name.split(".")
        if spec.name == "output.weight":
            return Q.Q6_K
        if parts[0] == "blk":
            il = int(parts[1])
            if parts[2] == "attn_v" and more_bits(attn_layers.index(il), len(attn_layers)):
                return Q.Q6_K
            if parts[2] == "ffn_down" and more_bits(il, shape.n_layer):
                return Q.Q6_K
        return Q.Q4_K

    return qtype


# file type and the type of each matrix: llama.cpp's Q4_K_M mix, or Q8_0 throughout (on a CPU, passes of several
# tokens give a one-token pass's logits bit for bit with Q8_0 weights, not with K-quants: bench/README.md)
QUANTS = {"q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, _q4_k_m),
          "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, lambda shape: lambda spec: Q.Q8_0)}
