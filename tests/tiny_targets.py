"""Tiny random-weight GGUF targets that llama.cpp loads and runs, one per supported architecture.

Every target shares one small SentencePiece-style vocabulary (`VOCAB`, 508 tokens), so their
token ids agree. Weights are f32, random normal, deterministic for a seed, and scaled (see
_EMBD_STD, _QK_GAIN) so that greedy output depends on the context and does not collapse into one
repeated token.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen35")

# Special tokens. MASK_ID is a spare control token that a DFlash drafter can use as its mask token.
UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>")
_WORDS = (
    "the of and to in is it that for on with as was he she they be at by this have from or one had "
    "not but what all were when we there can an your which said if do will each about how up out "
    "then many some so would other into has more her two like time no make than first now "
    "over down only way use water long little very after just know fox dog"
).split()


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: specials, the 256 byte tokens, then text pieces.

    Every prefix of a word piece is in the vocabulary, so SentencePiece's pairwise merges can build
    whole words; the score (merge priority) favours earlier pieces, like real frequencies would.
    """
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;\"()"]
    for word in _WORDS:
        w = "▁" + word
        pieces += [w[:i] for i in range(2, len(w) + 1)]
    pieces = list(dict.fromkeys(pieces))
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 3
    types += [int(gguf.TokenType.BYTE)] * 256 + [int(gguf.TokenType.NORMAL)] * len(pieces)
    scores = [0.0] * (len(_SPECIALS) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


VOCAB = _vocab()
N_VOCAB = len(VOCAB[0])

# Per-arch defaults: head_dim decoupled from n_embd / n_head where the real models do it too, and
# tied embeddings (no `output.weight`) where the real small models tie them.
_HEAD_DIM = {"qwen3": 32, "gemma3": 32, "qwen35": 32}
_TIED = {"llama": False, "qwen2": False, "qwen3": True, "gemma3": True, "qwen35": False}
_ROPE_BASE = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6, "qwen35": 1e7}

# qwen35 Gated-DeltaNet shapes: 2 key heads and 4 value heads of 16 (more value heads than key
# heads, as in the real models); every 4th layer is full attention, with RoPE on a quarter of the
# head. In GGUF terms: state_size = head size, group_count / time_step_rank = key / value heads.
QWEN35_SSM = {"conv_kernel": 4, "state_size": 16, "group_count": 2, "time_step_rank": 4}
QWEN35_FULL_ATTN_INTERVAL = 4
# gemma3: even layers slide over a 32-token window, odd layers attend globally.
GEMMA3_SWA = {"sliding_window": 32, "sliding_window_pattern": 2}

# Scales that keep random targets from collapsing into repeats (measured over seeds and prompts):
# embeddings enter the residual stream at std 0.1, well below the unit-scale sub-layer updates, so
# the context rather than the current token drives the prediction; Q and K are 3x unit scale, so
# attention is sharp instead of averaging the context into one slowly moving vector.
_EMBD_STD = 0.1
_QK_GAIN = 3.0


class _Weights:
    """Adds f32 tensors to a writer; shapes are numpy order (out, in), i.e. ggml's ne reversed."""

    def __init__(self, writer: gguf.GGUFWriter, rng: np.random.Generator) -> None:
        self.writer, self.rng = writer, rng

    def mat(self, name: str, n_out: int, n_in: int, std: float | None = None) -> None:
        # 1/sqrt(fan_in) keeps activations at unit scale through every projection
        std = n_in**-0.5 if std is None else std
        self.add(name, self.rng.normal(0.0, std, (n_out, n_in)))

    def norm(self, name: str, n: int, scale: float = 1.0) -> None:
        self.add(name, scale + self.rng.normal(0.0, 0.1, n))

    def add(self, name: str, data: np.ndarray) -> None:
        self.writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))


def write_tiny_target(
    arch: str,
    path: Path,
    *,
    seed: int = 0,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int | None = None,
    tied: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random target of `arch` (one of ARCHS) to `path` and return `path`.

    `head_dim` defaults to 32 for qwen3, gemma3 and qwen35, else to n_embd // n_head (llama and
    qwen2 require that); `tied` defaults per arch (_TIED); `n_ff` defaults to 3 * n_embd; no chat
    template unless one is given.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    head_dim = head_dim or _HEAD_DIM.get(arch, n_embd // n_head)
    n_ff = n_ff or 3 * n_embd
    tied = _TIED[arch] if tied is None else tied
    if arch in ("llama", "qwen2") and head_dim * n_head != n_embd:
        raise ValueError(f"{arch} needs head_dim * n_head == n_embd")
    path = Path(path)
    rng = np.random.default_rng([seed, ARCHS.index(arch)])
    w = gguf.GGUFWriter(path, arch)
    n_rot = head_dim // 4 if arch == "qwen35" else head_dim

    w.add_string("general.name", f"tiny-{arch}-s{seed}")
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.ALL_F32))
    for key, val in {
        "context_length": 2048, "embedding_length": n_embd, "block_count": n_layer,
        "feed_forward_length": n_ff, "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv, "attention.key_length": head_dim,
        "attention.value_length": head_dim, "rope.dimension_count": n_rot,
    }.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", _ROPE_BASE[arch])
    if arch == "gemma3":
        for key, val in GEMMA3_SWA.items():
            w.add_uint32(f"gemma3.attention.{key}", val)
        w.add_float32("gemma3.rope.freq_base_swa", 10000.0)
    if arch == "qwen35":
        for key, val in QWEN35_SSM.items():
            w.add_uint32(f"qwen35.ssm.{key}", val)
        value_dim = QWEN35_SSM["state_size"] * QWEN35_SSM["time_step_rank"]
        w.add_uint32("qwen35.ssm.inner_size", value_dim)
        w.add_uint32("qwen35.full_attention_interval", QWEN35_FULL_ATTN_INTERVAL)
        half = n_rot // 2  # text-only M-RoPE: every section sees the same position
        sections = [half - 2 * (half // 3), half // 3, half // 3, 0]
        w.add_array("qwen35.rope.dimension_sections", sections)

    tokens, scores, types = VOCAB
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    w.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    w.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", True)
    if chat_template:
        w.add_chat_template(chat_template)

    t = _Weights(w, rng)
    # gemma3 multiplies embeddings by sqrt(n_embd) before the first layer
    embd_std = _EMBD_STD / n_embd**0.5 if arch == "gemma3" else _EMBD_STD
    t.mat("token_embd.weight", N_VOCAB, n_embd, std=embd_std)
    # Logits get a std of ~4 (peaked enough for structure, not one-hot): from the output matrix, or
    # for tied embeddings from the final norm's scale.
    t.norm("output_norm.weight", n_embd, scale=4.0 / (embd_std * n_embd**0.5) if tied else 1.0)
    if not tied:
        t.mat("output.weight", N_VOCAB, n_embd, std=4.0 / n_embd**0.5)
    for i in range(n_layer):
        _layer(arch, t, f"blk.{i}.", i, n_embd, n_head, n_head_kv, head_dim, n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _layer(arch: str, t: _Weights, p: str, il: int, n_embd: int, n_head: int, n_head_kv: int,
           head_dim: int, n_ff: int) -> None:
    t.norm(p + "attn_norm.weight", n_embd)
    if arch == "qwen35" and (il + 1) % QWEN35_FULL_ATTN_INTERVAL != 0:
        _gated_delta_net(t, p, n_embd)
    else:
        # qwen35 attention projects a sigmoid output gate together with Q
        n_q = n_head * head_dim * (2 if arch == "qwen35" else 1)
        qk_norm = arch in ("qwen3", "gemma3", "qwen35")
        qk_std = n_embd**-0.5 * (1.0 if qk_norm else _QK_GAIN)
        t.mat(p + "attn_q.weight", n_q, n_embd, std=qk_std)
        t.mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd, std=qk_std)
        t.mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        t.mat(p + "attn_output.weight", n_embd, n_head * head_dim)
        if arch == "qwen2":
            t.add(p + "attn_q.bias", t.rng.normal(0.0, 0.1, n_q))
            t.add(p + "attn_k.bias", t.rng.normal(0.0, 0.1, n_head_kv * head_dim))
            t.add(p + "attn_v.bias", t.rng.normal(0.0, 0.1, n_head_kv * head_dim))
        if qk_norm:
            t.norm(p + "attn_q_norm.weight", head_dim, scale=_QK_GAIN)
            t.norm(p + "attn_k_norm.weight", head_dim, scale=_QK_GAIN)
    if arch in ("gemma3", "qwen35"):
        t.norm(p + "post_attention_norm.weight", n_embd)
    if arch != "qwen35":  # qwen35 feeds post_attention_norm's output to the FFN
        t.norm(p + "ffn_norm.weight", n_embd)
    t.mat(p + "ffn_gate.weight", n_ff, n_embd)
    t.mat(p + "ffn_up.weight", n_ff, n_embd)
    t.mat(p + "ffn_down.weight", n_embd, n_ff)
    if arch == "gemma3":
        t.norm(p + "post_ffw_norm.weight", n_embd)


def _gated_delta_net(t: _Weights, p: str, n_embd: int) -> None:
    """Tensors of a qwen35 linear-attention layer, as the llama.cpp converter lays them out."""
    d_state, n_k_heads = QWEN35_SSM["state_size"], QWEN35_SSM["group_count"]
    n_v_heads = QWEN35_SSM["time_step_rank"]
    key_dim, value_dim = d_state * n_k_heads, d_state * n_v_heads
    conv_dim = 2 * key_dim + value_dim
    t.mat(p + "attn_qkv.weight", conv_dim, n_embd)
    t.mat(p + "attn_gate.weight", value_dim, n_embd)
    t.mat(p + "ssm_conv1d.weight", conv_dim, QWEN35_SSM["conv_kernel"])
    t.add(p + "ssm_dt.bias", t.rng.normal(0.0, 0.5, n_v_heads))
    # the converter stores -exp(A_log): negative, so the state decays
    t.add(p + "ssm_a", -np.exp(t.rng.uniform(-1.0, 1.0, n_v_heads)))
    t.mat(p + "ssm_beta.weight", n_v_heads, n_embd)
    t.mat(p + "ssm_alpha.weight", n_v_heads, n_embd)
    t.norm(p + "ssm_norm.weight", d_state)
    t.mat(p + "ssm_out.weight", n_embd, value_dim)
