"""The target model in llama.cpp, through llama-cpp-python's low-level API.

One sequence (id 0) for generation; several for the trainer's data, which answers prompts in parallel.
Hidden states for the drafter go to the native capture: pulled from llama.cpp's own layer-input capture where the
architecture's graph records its layer inputs, else copied by the capture installed as the context's eval callback
(which splits the graph at each wanted layer); recurrent/hybrid memory gets exact rollback (llama.cpp snapshots where the
architecture has them, else a saved sequence state that is restored and re-decoded).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import llama_cpp as lc
import numpy as np

from dflash_local.errors import UserError
from dflash_local.native import Capture, Drafter, cpu_has_amx, greedy_sampler
from dflash_local.native import lib as native_lib
from dflash_local.sampling import SamplingParams
from dflash_local.target_check import check_target_file
from dflash_local.tree import TREE_SIZE


# Architectures whose llama.cpp graph records each layer's input (res->t_layer_inp), so that llama.cpp extracts the
# wanted layers' rows itself, with no graph split; on any other it aborts, and the eval callback captures there.
LAYER_INPUT_ARCHS = frozenset({"llama", "qwen3", "qwen3moe", "qwen35", "qwen35moe"})


def _layer_input_api() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """llama_set_embeddings_layer_inp and llama_get_embeddings_layer_inp of the pinned llama.cpp (src/llama-ext.h), or
    None. They are C++ functions, exported under mangled names; their arguments (a pointer, an unsigned int, a bool)
    pass as in C."""
    lib = lc.llama_cpp._lib
    try:
        set_inp = lib["_Z30llama_set_embeddings_layer_inpP13llama_contextjb"]
        get_inp = lib["_Z30llama_get_embeddings_layer_inpP13llama_contextj"]
    except AttributeError:
        return None
    set_inp.argtypes, set_inp.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None
    get_inp.argtypes, get_inp.restype = [ctypes.c_void_p, ctypes.c_uint32], ctypes.c_void_p
    return set_inp, get_inp


# the helper's C log sink: no Python inside llama.cpp's calls (a Ctrl-C landing in a Python callback would be lost)
_QUIET_LOG = lc.llama_log_callback(ctypes.cast(native_lib.dflash_quiet_log, ctypes.c_void_p).value)


def quiet_llama_logs() -> None:
    """Only llama.cpp's errors reach the terminal (stderr)."""
    lc.llama_log_set(_QUIET_LOG, ctypes.c_void_p())


@dataclass
class TargetParams:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 0  # 0: n_batch
    n_gpu_layers: int = 0
    n_threads: int = 0  # 0: the cores this process may use (available_cores)
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    n_seq: int = 1  # parallel sequences, each with n_ctx tokens
    kv_unified: bool = False  # one KV buffer of n_ctx for all sequences: a batch of several keeps its order


def _sampler_chains(p: SamplingParams, n_seqs: int) -> dict[int, list[ctypes.c_void_p]]:
    """Backend samplers for sequence 0 drawing from sampling.target_probs's distribution: temperature, then top-k on
    the scaled logits, top-p and min-p on their softmax (min-p's ratio to the likeliest is the same with or without
    top-p's renormalization), then a draw. Greedy: the argmax of all of a pass's rows at once (llama.cpp's own greedy
    sampler takes one row at a time, one GPU block each), for sequences 0 .. n_seqs - 1 (a tree's branches), which
    share it."""
    if p.greedy:
        lead = greedy_sampler()
        return {seq: [ctypes.cast(greedy_sampler(lead) if seq else lead, lc.llama_sampler_p_ctypes)]
                for seq in range(n_seqs)}
    chain = [lc.llama_sampler_init_temp(p.temperature)]
    if p.top_k > 0:
        chain.append(lc.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        chain.append(lc.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        chain.append(lc.llama_sampler_init_min_p(p.min_p, 1))
    return {0: [*chain, lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if p.seed is None else p.seed % 2**32)]}


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity): the thread count for llama.cpp's and the drafter's CPU
    kernels. llama.cpp's own default is 4 threads, which oversubscribes 2 cores: SmolLM2 ran at 49 tok/s there, against
    160 with 2 threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


# GGUF value types (gguf.GGUFValueType): struct formats of the fixed-size ones
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_arch(path: Path) -> str:
    """general.architecture of a GGUF file, with a clear error for anything that is not GGUF.

    Reads the header's keys up to that one (writers put it first), not the whole header: gguf's GGUFReader parses
    every key and tensor, which took 12 s for the 151,665-token vocabulary and merges of Qwen2.5 on this CPU."""
    try:
        with open(path, "rb") as f:
            magic, version, _, n_kv = struct.unpack("<4sIQQ", _read(f, 24))
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r}, version {version}")
            for _ in range(n_kv):
                key = _read_string(f)
                (vtype,) = struct.unpack("<I", _read(f, 4))
                if key == "general.architecture" and vtype == _GGUF_STRING:
                    return _read_string(f)
                _skip_value(f, vtype)
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a valid GGUF file ({e})") from e
    raise UserError(f"{path} has no general.architecture key")


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise ValueError("truncated header")
    return data


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    if n > 1 << 16:  # a key or an architecture's name; a corrupt length must not allocate gigabytes
        raise ValueError(f"a key of {n} bytes")
    return _read(f, n).decode()


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _GGUF_SCALARS:
        f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
    elif vtype == _GGUF_STRING:
        f.seek(struct.unpack("<Q", _read(f, 8))[0], 1)
    elif vtype == _GGUF_ARRAY:
        etype, count = struct.unpack("<IQ", _read(f, 12))
        if etype in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise ValueError(f"unknown value type {vtype}")


class Target:
    """A loaded target model and its llama.cpp context."""

    def __init__(self, path: str | Path, params: TargetParams, capture_layers: tuple[int, ...] = (),
                 rollback: int = 0, branches: int = 0, model_of: Target | None = None):
        """rollback: recurrent state snapshots to keep for rejected drafts. branches: the most drafts of a tree that
        decode_tree verifies (each leaf a sequence sharing the prefix's cells; attention models with one sequence
        only, else 0). model_of: a Target of the same file whose loaded weights this one's context uses (it must
        be closed after this one), so that a second context costs no second copy."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"target model not found: {path}")
        if params.n_seq > min(params.n_batch, params.n_ctx):  # llama.cpp reserves an output per sequence, and aborts
            raise ValueError(f"{params.n_seq} sequences need a batch and a context of as many tokens")
        self.arch = check_target_file(path).arch  # the checks llama.cpp lacks, before it reads the file
        if self.arch == "dflash":
            raise UserError(f"{path} is a DFlash drafter, not a target model")
        self.path, self.params = path, params
        self._owns_model = model_of is None
        self.model = self._load_model(path, params) if model_of is None else model_of.model
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_layer = lc.llama_model_n_layer(self.model)
        self.recurrent = bool(lc.llama_model_is_recurrent(self.model) or lc.llama_model_is_hybrid(self.model))

        # llama.cpp reserves an output per sequence within a batch, which it clamps to the context (it aborts if not)
        branches = min(branches, params.n_batch, params.n_ctx)
        self.branches = branches if branches > 1 and params.n_seq == 1 and not self.recurrent else 0
        kv_unified = params.kv_unified or self.branches > 0  # the leaves' cells share the prefix's

        self.capture = Capture(self.n_embd, list(capture_layers)) if capture_layers else None
        self.capture_layers = tuple(capture_layers)
        self._layer_inputs = _layer_input_api() if capture_layers and self.arch in LAYER_INPUT_ARCHS else None
        cp = lc.llama_context_default_params()
        cp.n_ctx = params.n_ctx if kv_unified else params.n_ctx * params.n_seq
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_ubatch or params.n_batch
        cp.n_seq_max = max(params.n_seq, self.branches)
        # by default a KV buffer per sequence: in one shared buffer every token's attention runs over all
        # sequences' cells (masked), which grows with the square of n_seq. llama.cpp then cuts a batch into one
        # ubatch per run of consecutive sequence ids (so step() wants them ascending) and regroups a batch of
        # unequal sequences; a shared buffer keeps the batch's order (prefill()).
        cp.kv_unified = kv_unified
        self.n_threads = params.n_threads or available_cores()
        cp.n_threads = cp.n_threads_batch = self.n_threads
        if self.recurrent and rollback > 0:
            cp.n_rs_seq = rollback
        # a verified block's rows (a tree's are all sequence 0's only when it is one chain), each its argmax in the graph
        cp.n_outputs_max_per_seq = TREE_SIZE + 1 if capture_layers else 1
        if self.capture and not self._layer_inputs:
            cp.cb_eval = self.capture.callback
            cp.cb_eval_user_data = self.capture.user_data
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise UserError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {path}")
        if self._layer_inputs:
            for layer in capture_layers:  # layer L's input is what the callback would take: layer L-1's output
                self._layer_inputs[0](self.ctx, layer, True)
        self.n_seq = params.n_seq
        self.kv_unified = kv_unified
        self.n_ctx = lc.llama_n_ctx(self.ctx) // (1 if kv_unified else params.n_seq)  # per sequence
        self.mem = lc.llama_get_memory(self.ctx)
        # recurrent state rolls back through llama.cpp's snapshots when it keeps enough of them
        self.snapshots = self.recurrent and rollback > 0 and lc.llama_n_rs_seq(self.ctx) >= rollback
        # llama.cpp clamps n_batch to the context size
        self.n_batch = lc.llama_n_batch(self.ctx)
        self._batch = lc.llama_batch_init(self.n_batch, 0, max(1, self.branches))
        self._saved: ctypes.Array | None = None
        self._samplers: dict[int, ctypes.c_void_p] = {}  # sequence -> its backend sampler chain, while any
        self.picks_on_device = False  # pick_on_device
        self._picked_all = False  # the last decode's outputs all have a token picked in the graph

    def _load_model(self, path: Path, params: TargetParams) -> lc.llama_model_p:
        quiet_llama_logs()
        lc.llama_backend_init()  # the API asks for it before the first model: ggml's timer and f16 tables; repeatable
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = params.n_gpu_layers
        mp.main_gpu = params.main_gpu
        # the AMX weight buffers crash ggml's matmul on Sapphire Rapids CPUs (llama.cpp #20824)
        mp.use_extra_bufts = not cpu_has_amx()
        if params.tensor_split:
            self._split = (ctypes.c_float * len(params.tensor_split))(*params.tensor_split)
            mp.tensor_split = self._split
        model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise UserError(f"llama.cpp could not load {path} (unsupported architecture '{self.arch}' or corrupt file)")
        return model

    # ---- text --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 16))()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, True)
        if n < 0:
            buf = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, True)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes; a control token's (e.g. <|im_start|>) only where `special`."""
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def text(self, tokens: list[int], special: bool = False) -> str:
        """The text of whole tokens; a character cut by the end shows as U+FFFD."""
        return b"".join(self.piece(t, special) for t in tokens).decode(errors="replace")

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str | None:
        """(role, content) messages under the GGUF's chat template, ending with the assistant's
        turn; None when the model has no template llama.cpp knows."""
        tmpl = lc.llama_model_chat_template(self.model, None)
        if not tmpl:
            return None
        msgs = (lc.llama_chat_message * len(messages))(
            *(lc.llama_chat_message(role.encode(), text.encode()) for role, text in messages))
        n = lc.llama_chat_apply_template(tmpl, msgs, len(messages), True, None, 0)
        if n < 0:
            return None
        buf = ctypes.create_string_buffer(n + 1)
        lc.llama_chat_apply_template(tmpl, msgs, len(messages), True, buf, n + 1)
        return buf.raw[:n].decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    # ---- evaluation --------------------------------------------------------------------------
    @property
    def capture_method(self) -> str | None:
        """How the drafter's layers are captured, if they are."""
        return "layer inputs" if self._layer_inputs else "eval callback" if self.capture else None

    def decode(self, tokens: list[int], pos0: int, all_logits: bool, seq: int = 0,
               keep_rows: bool = False) -> np.ndarray:
        """Run tokens of sequence seq at positions pos0.. and return logits rows (all, or the last) as a view.
        keep_rows: this pass's feature rows go after those held (earlier passes' rows that wait for one drafter
        pass), else they replace them."""
        if all_logits and len(tokens) > self.n_batch:
            raise ValueError("all_logits needs the tokens to fit one batch")
        if pos0 + len(tokens) > self.n_ctx:
            raise UserError(f"context is full: {pos0 + len(tokens)} tokens exceed --ctx-size {self.n_ctx}")
        if self.capture and not keep_rows:
            self.capture.reset()
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            self._run(chunk, range(pos0 + start, pos0 + start + len(chunk)), [(seq,)] * len(chunk),
                      [all_logits or (last_chunk and i == len(chunk) - 1) for i in range(len(chunk))])
        return self.logits(len(tokens) if all_logits else 1)

    def prefill(self, sequences: list[list[int]]) -> None:
        """Several sequences from position 0 in one batch of at most n_batch tokens, the i-th as sequence i (in a
        kv_unified context: the capture's rows then come in the order of the batch)."""
        tokens = [t for seq in sequences for t in seq]
        if (len(sequences) > 1 and not self.kv_unified) or len(tokens) > self.n_batch:
            raise ValueError("prefill wants a kv_unified context and at most n_batch tokens")
        if self.capture:
            self.capture.reset()
        self._run(tokens, [p for seq in sequences for p in range(len(seq))],
                  [(i,) for i, seq in enumerate(sequences) for _ in seq], [False] * (len(tokens) - 1) + [True])

    def step(self, tokens: list[int], positions: list[int], seqs: list[int]) -> None:
        """One token for each of several sequences, in one batch, each an output (logits(n), or sampled(seqs)).
        Ascending, consecutive sequence ids make one ubatch (see __init__)."""
        self._run(tokens, positions, [(s,) for s in seqs], [True] * len(tokens))

    def sample_on_device(self, min_p: float | None, seed: int = 0) -> bool:
        """While min_p is given, llama.cpp samples every sequence's next token inside the graph (its backend
        sampling, where the model runs), at temperature 1 among the tokens within min_p of the likeliest; read them
        with sampled(). None: off again. False (and off) when llama.cpp cannot sample on this backend."""
        if min_p is None:
            return self._use_samplers({})
        return self._use_samplers({seq: [lc.llama_sampler_init_min_p(min_p, 1),
                                         lc.llama_sampler_init_dist((seed + seq) % 2**32)] for seq in range(self.n_seq)})

    def pick_on_device(self, sampling: SamplingParams | None) -> bool:
        """While sampling is given, llama.cpp picks the target's token for each of sequence 0's outputs in the graph,
        where the model runs (greedy: the argmax; else a sample from the distribution of target_probs, each row with
        a random number of its own), and leaves their logits there: a verification's rows of 150k logits, on a GPU,
        cost a copy to the host. Greedy, every sequence a tree's branches use too, sharing sequence 0's argmax: a
        tree's rows are picked in one as well. Read the tokens with picks(), commit the ones used with commit().
        None: off, logits as usual. False when this backend cannot."""
        self._use_samplers({} if sampling is None else _sampler_chains(sampling, max(1, self.branches)))
        self.picks_on_device = sampling is not None and bool(self._samplers)
        return self.picks_on_device

    def _use_samplers(self, chains: dict[int, list[ctypes.c_void_p]]) -> bool:
        """Backend samplers by sequence (each a chain of llama.cpp samplers), in place of any before; False (and
        none) when this backend cannot run them."""
        for seq in self._samplers:
            lc.llama_set_sampler(self.ctx, seq, None)
        self._free_samplers()
        self.picks_on_device = False
        for seq, parts in chains.items():
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            for part in parts:
                lc.llama_sampler_chain_add(chain, part)
            self._samplers[seq] = chain
            if not lc.llama_set_sampler(self.ctx, seq, chain):
                self._use_samplers({})
                return False
        return True

    def sampled(self, seqs: list[int]) -> np.ndarray:
        """The tokens sampled for the last decode's outputs, one per sequence of seqs in order (sample_on_device).
        Each is accepted, which moves its sampler's random state on (else the next decode draws the same number)."""
        tokens = np.array([lc.llama_get_sampled_token_ith(self.ctx, i - len(seqs)) for i in range(len(seqs))])
        for seq, token in zip(seqs, tokens):
            lc.llama_sampler_accept(self._samplers[seq], int(token))
        return tokens

    def picks(self, n_out: int) -> np.ndarray | None:
        """The tokens picked in the graph for the last decode's n_out outputs (pick_on_device), or None where not all
        of them were (sampling, a tree's row of another sequence than 0 keeps its logits, and then every row does)."""
        if not self._picked_all:
            return None
        return np.array([lc.llama_get_sampled_token_ith(self.ctx, i - n_out) for i in range(n_out)])

    def commit(self, tokens: list[int]) -> None:
        """The picks of the last decode that were used (a chain's first rows, a tree's path), in order: the sampler's
        random state moves on past their draws (the unused rows' draws come again in the next decode, which is fine:
        they decided nothing)."""
        if self._picked_all:
            for token in tokens:
                lc.llama_sampler_accept(self._samplers[0], token)

    def decode_tree(self, tokens: list[int], depths: list[int], seqs: list[tuple[int, ...]], pos0: int) -> np.ndarray:
        """Verify a tree of drafts in one pass: token i (0: the anchor, the root) at position pos0 + depths[i], in the
        sequences of the leaves below it (seqs[i], each leaf a sequence). llama.cpp masks a token's attention by
        its first sequence, which sees just the token's ancestors; each sequence first gets the prefix of sequence
        0. Returns the logits of every token; keep_branch then keeps one path."""
        if len(tokens) > self.n_batch or pos0 + len(tokens) > self.n_ctx:  # every node takes a cell of its own
            raise ValueError("the tree must fit one batch and the context")
        for s in range(1, len(seqs[0])):
            lc.llama_memory_seq_cp(self.mem, 0, s, 0, pos0)
        if self.capture:
            self.capture.reset()
        self._run(tokens, [pos0 + d for d in depths], seqs, [True] * len(tokens))
        return self.logits(len(tokens))

    def keep_branch(self, n_keep: int, replay: list[int], n_seqs: int) -> None:
        """After decode_tree: sequence 0 keeps its cells before position n_keep, the other sequences and cells go, and
        the tokens of `replay` are decoded again from n_keep on. The accepted path's cells stay in the order of its
        positions so (attention sums its cells in the cache's order, which the target alone keeps): a path off the
        batch's first chain is replayed from where it leaves it."""
        lc.llama_memory_seq_rm(self.mem, 0, n_keep, -1)
        for s in range(1, n_seqs):
            lc.llama_memory_seq_rm(self.mem, s, -1, -1)
        if replay:
            self._uncaptured(replay, n_keep, all_logits=False)

    def _run(self, tokens: list[int], positions: Sequence[int], seqs: Sequence[Sequence[int]],
             logits: list[bool]) -> None:
        """One llama_decode of a batch: token i at positions[i] of the sequences seqs[i] (its attention: those of
        the first), its logits kept if logits[i]."""
        b = self._batch
        b.n_tokens = len(tokens)
        for i, (t, p, ss, keep) in enumerate(zip(tokens, positions, seqs, logits, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, len(ss), keep
            for j, s in enumerate(ss):
                b.seq_id[i][j] = s
        # llama.cpp leaves the logits in the graph only where every output has a sampler (each row goes to the one
        # of its first sequence)
        self._picked_all = self.picks_on_device and all(ss[0] in self._samplers
                                                        for ss, keep in zip(seqs, logits) if keep)
        if self.capture:
            self.capture.flush()  # an earlier chunk's rows, which this decode overwrites in llama.cpp's buffers
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) at position {min(positions)}")
        if self._layer_inputs and self.capture.enabled:
            self.capture.defer(self._layer_input_rows, len(tokens))

    def _layer_input_rows(self) -> list[int]:
        lc.llama_synchronize(self.ctx)  # llama.cpp copies the rows out asynchronously
        get_inp = self._layer_inputs[1]
        return [get_inp(self.ctx, layer) for layer in self.capture_layers]

    def inject_rows(self, drafter: Drafter, n: int, pos: int) -> None:
        """The first n feature rows held (the last decode's, after any it kept) into the drafter at pos, read where
        they are, each layer's rows apart (Capture.layers): where llama.cpp left them where it can, else in the
        capture."""
        drafter.inject_layers(self.capture.layers(n), n, pos)

    def inject_path(self, drafter: Drafter, rows: list[int], pos: int) -> None:
        """As inject_rows, the last decode's rows `rows` (a tree's accepted path) at pos, pos + 1, ..."""
        n_held = max(rows) + 1
        drafter.inject_gather(self.capture.layers(n_held), n_held, rows, pos)

    def logits(self, n_out: int) -> np.ndarray:
        """Logits rows of the last decode's n_out outputs, as a view."""
        return np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def features(self) -> np.ndarray:
        """Captured hidden-state rows of the last decode."""
        return self.capture.rows()

    def n_cached(self) -> int:
        """Positions sequence 0 holds in the cache (its last one + 1)."""
        return lc.llama_memory_seq_pos_max(self.mem, 0) + 1

    def save_state(self) -> None:
        """Keep the recurrent state before a verification that may be partly rejected (or a trial)."""
        flags = lc.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = lc.llama_state_seq_get_size_ext(self.ctx, 0, flags)
        if self._saved is None or len(self._saved) < size:
            self._saved = (ctypes.c_uint8 * size)()
        lc.llama_state_seq_get_data_ext(self.ctx, self._saved, size, 0, flags)

    def rollback(self, n_keep: int, pos0: int, replay: list[int]) -> None:
        """Keep positions < n_keep. Recurrent state without snapshots is restored from save_state()
        (taken at pos0) and the kept tokens from pos0 on are decoded again."""
        if not self.recurrent or self.snapshots:
            if not lc.llama_memory_seq_rm(self.mem, 0, n_keep, -1):
                raise RuntimeError(f"llama.cpp could not roll the sequence back to {n_keep} tokens")
            return
        self._restore(pos0)
        if replay:
            self._uncaptured(replay, pos0, all_logits=False)

    def _restore(self, pos0: int) -> None:
        """Sequence 0 as it was at pos0: the recurrent state kept by save_state() there, the attention cache cut."""
        flags = lc.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        if self.recurrent and lc.llama_state_seq_set_data_ext(self.ctx, self._saved, len(self._saved), 0, flags) == 0:
            raise RuntimeError("llama.cpp could not restore the saved sequence state")
        lc.llama_memory_seq_rm(self.mem, 0, pos0, -1)

    def trial_picks(self, tokens: list[int], pos0: int) -> list[int]:
        """The greedy pick after each prefix of tokens, from one pass over them at pos0 as a verification makes it,
        with the cache left as it was (save_state() first on a recurrent target): what a verification of these
        drafts would accept, found beforehand (bench/emulate.py)."""
        logits = self._uncaptured(tokens, pos0, all_logits=True)
        picks = self.picks(len(tokens))
        self._restore(pos0)
        return picks.tolist() if picks is not None else np.argmax(logits, axis=1).tolist()

    def _uncaptured(self, tokens: list[int], pos0: int, all_logits: bool) -> np.ndarray:
        """Decode with the capture off: a replay of tokens the drafter has already seen, or a trial."""
        with self.capture.paused() if self.capture else nullcontext():
            return self.decode(tokens, pos0, all_logits)

    def clear(self, seq: int | None = None) -> None:
        """Forget all sequences, or one."""
        if seq is None:
            lc.llama_memory_clear(self.mem, True)
        else:
            lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ctx)
            self.ctx = None
            self._free_samplers()  # after the context, which holds them
        if getattr(self, "model", None):
            if self._owns_model:
                lc.llama_model_free(self.model)
            self.model = None
        if getattr(self, "capture", None):
            self.capture.close()

    def _free_samplers(self) -> None:
        for chain in self._samplers.values():
            lc.llama_sampler_free(chain)
        self._samplers = {}

    def __del__(self) -> None:
        self.close()
