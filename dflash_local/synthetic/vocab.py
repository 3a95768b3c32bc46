"""A small SentencePiece-style vocabulary that llama.cpp's `llama` tokenizer runs, padded to any size.

Every synthetic target shares its first N_BASE tokens, so their token ids agree; a large vocabulary (a real model's
248,320 tokens, say) adds filler pieces that no text tokenizes to, since none of their prefixes is a piece.
"""

from __future__ import annotations

import gguf

# Special tokens. MASK_ID is a spare control token that a DFlash drafter can use as its mask token.
UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>")
WORDS = (
    "the of and to in is it that for on with as was he she they be at by this have from or one had "
    "not but what all were when we there can an your which said if do will each about how up out "
    "then many some so would other into has more her two like time no make than first now "
    "over down only way use water long little very after just know fox dog"
).split()


def _base() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: specials, the 256 byte tokens, then text pieces.

    Every prefix of a word piece is in the vocabulary, so SentencePiece's pairwise merges can build
    whole words; the score (merge priority) favours earlier pieces, like real frequencies would.
    """
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;\"()"]
    for word in WORDS:
        w = "▁" + word
        pieces += [w[:i] for i in range(2, len(w) + 1)]
    pieces = list(dict.fromkeys(pieces))
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 3
    types += [int(gguf.TokenType.BYTE)] * 256 + [int(gguf.TokenType.NORMAL)] * len(pieces)
    scores = [0.0] * (len(_SPECIALS) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


VOCAB = _base()
N_BASE = len(VOCAB[0])


def vocab(n_vocab: int = N_BASE) -> tuple[list[str], list[float], list[int]]:
    """The base vocabulary padded with fillers `<extra_i>` to n_vocab tokens."""
    if n_vocab < N_BASE:
        raise ValueError(f"a synthetic vocabulary has at least {N_BASE} tokens, not {n_vocab}")
    tokens, scores, types = VOCAB
    n = n_vocab - N_BASE
    return ([*tokens, *(f"<extra_{i}>" for i in range(n))], [*scores, *[-float(N_BASE + i) for i in range(n)]],
            [*types, *[int(gguf.TokenType.NORMAL)] * n])


def add_tokenizer(w: gguf.GGUFWriter, n_vocab: int = N_BASE, chat_template: str | None = None) -> None:
    """The tokenizer.* keys of a target with this vocabulary (llama.cpp's `llama`, i.e. SentencePiece, tokenizer)."""
    tokens, scores, types = vocab(n_vocab)
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
