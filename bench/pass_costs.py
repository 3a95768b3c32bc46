"""What one pass of each part of DFlash costs on this machine (issue 26), to set against what `dflash bench` measures:

- the target's pass of one token in a context of its own (as the target alone runs, `target_alone`), and of k = 1, 2,
  4, 8, 16 tokens in DFlash's context (the capture's callback, recurrent snapshots), capturing (`verify_capture`) and
  with the capture switched off (`verify_no_capture`); each row's greedy pick is made in the graph, as the engine
  verifies;
- for DFlash's context, the rollback after a pass of k tokens whose drafts were all rejected (`rollback`: llama.cpp's
  snapshots on hybrid targets, a cache trim on attention ones);
- the drafter's block pass drafting k - 1 tokens (`draft`) and its context pass over k accepted rows (`inject`), which
  reads them where a step's injection does (Target.inject_rows: where llama.cpp left them, with its layer-input
  capture; the capture's copy with the callback's);
- the step of each chain length as the adaptive policy calibrates it (calibrate.measure, `policy_step`);
- on hybrid targets the recurrent state of a sequence and the memory of its snapshots (llama.cpp keeps n_rs_seq of
  them: `llama_n_rs_seq`); on NVIDIA GPUs the device memory of the drafter (its weights, the target's embedding and
  head, its cache for --ctx-size), of the target's weights with DFlash's context (together what `dflash run --tree-size
  0 -c N` holds), and of the target alone's context;
- the speedup bound tau_k x t(target alone, 1 token) / (t(verify, k) + P(a draft rejected) t(rollback, k) + t(draft,
  k) + t(inject, k)) for a geometric profile of each --tau cut to a block of k (tau_k; bench/emulate.py).

Medians of --repeats runs after one warm-up (calibrate.median_seconds), at --context positions of a made-up prompt.

    python -P bench/pass_costs.py TARGET DRAFTER [--context 512] [--ctx-size N] [--sizes 1,2,4,8,16] [--repeats 5]
        [--tau 3.4,7.7] [--threads N] [--n-gpu-layers N] [--device CUDA0] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp as lc  # first: numpy loaded before llama.cpp's libraries crashed its model load on the GPU machines

import argparse
from pathlib import Path

from dflash_local import calibrate
from dflash_local.bench.emulate import geometric
from dflash_local.bench.machine import file_info, gpu_used_mb, script_header
from dflash_local.bench.report import write_json
from dflash_local.draft_length import choices_for
from dflash_local.loader import open_drafter
from dflash_local.sampling import SamplingParams
from dflash_local.target import Target, TargetParams, read_gguf_arch

TEXT = ("def parse(rows):\n    total = {}\n    for month, amount in rows:\n        total[month] = total.get(month, 0) "
        "+ amount\n    return total\n The water is very long and the fox is little. ")


def _gpu_delta(before: float | None) -> float | None:
    now = gpu_used_mb()
    return None if now is None or before is None else now - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--context", type=int, default=512, help="positions of context before the measured passes")
    ap.add_argument("--ctx-size", type=int, default=0, help="the contexts' size (default: what the passes need)")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tau", default="3.4,7.7", help="profiles (geometric, mean tau) for the speedup bound")
    ap.add_argument("--threads", "-t", type=int, default=0)
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--device", default=None, help="the drafter's ggml device")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sizes = sorted({int(k) for k in a.sizes.split(",")})
    # the rollbacks walk forward a position each (a hybrid's snapshots roll back once after a pass)
    need = a.context + max(sizes) + (a.repeats + 2) * len(sizes)
    params = TargetParams(n_ctx=a.ctx_size or -(-need // 256) * 256, n_gpu_layers=a.n_gpu_layers,
                          n_threads=a.threads)
    if a.context < 1 or need > params.n_ctx:
        ap.error(f"--context {a.context} and the passes need --ctx-size {need} at least")

    gpu = gpu_used_mb()
    dr = open_drafter(a.drafter, a.target, params, a.device)
    memory = {"drafter_gpu_mb": _gpu_delta(gpu)}
    if max(sizes) > dr.info.block_size:
        ap.error(f"--sizes: the drafter's block is {dr.info.block_size} tokens")
    gpu = gpu_used_mb()
    # DFlash's context: capture, and snapshots for a block (chains: no tree buffer); with the drafter, what
    # `dflash run --tree-size 0` holds
    tg = Target(a.target, params, capture_layers=dr.info.target_layers, rollback=dr.info.block_size)
    memory["weights_and_dflash_ctx_gpu_mb"] = _gpu_delta(gpu)
    gpu = gpu_used_mb()
    plain = Target(a.target, params, model_of=tg)  # the target alone's context, as `dflash bench` opens it
    memory["plain_ctx_gpu_mb"] = _gpu_delta(gpu)

    tokens = (tg.tokenize(TEXT, add_special=False) or [1]) * (params.n_ctx // 8 + 8)
    prompt, block = tokens[:a.context], tokens[a.context:a.context + max(sizes)]
    pos, anchor = a.context, block[0]
    for t in (plain, tg):
        t.pick_on_device(SamplingParams())  # as the engine verifies: greedy picks in the graph, no logits to the host
        t.decode(prompt, 0, all_logits=False)
        if t.recurrent and not t.snapshots:
            t.save_state()  # rollback() restores it
    tg.inject_rows(dr, len(prompt), 0)
    if tg.recurrent:  # the recurrent state of one sequence (once it holds one), and llama.cpp's n_rs_seq copies of it
        state_mb = lc.llama_state_seq_get_size_ext(plain.ctx, 0, lc.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) / 2**20
        n_rs = lc.llama_n_rs_seq(tg.ctx)
        memory |= {"recurrent_state_mb": state_mb, "n_rs_seq": n_rs, "snapshots_mb": n_rs * state_mb,
                   "rollback": "snapshots" if tg.snapshots else "saved state"}

    def ms(step, after=None) -> float:
        return 1e3 * calibrate.median_seconds(step, a.repeats, after)

    def undo(t: Target) -> None:
        t.rollback(pos, pos, [])

    res: dict[str, dict[int, float]] = {k: {} for k in ("target_alone", "verify_capture", "verify_no_capture",
                                                         "rollback", "draft", "inject")}
    for k in sizes:
        toks = block[:k]
        if k == 1:  # the target alone passes one token (its context keeps one output a sequence)
            res["target_alone"][k] = ms(lambda: plain.decode(toks, pos, all_logits=True), lambda: undo(plain))
        for key, on in (("verify_no_capture", False), ("verify_capture", True)):
            tg.capture.enable(on)
            res[key][k] = ms(lambda: tg.decode(toks, pos, all_logits=True), lambda: undo(tg))
        tg.decode(toks, pos, all_logits=True)  # its rows stay where the injection reads them, as a step's do
        undo(tg)
        if k > 1:
            res["draft"][k] = ms(lambda: dr.draft(anchor, dr.info.block_size, k - 1))
        res["inject"][k] = ms(lambda: tg.inject_rows(dr, k, pos), lambda: dr.crop(pos))
    at = pos  # each rollback follows a pass at `at`: all its drafts rejected, the anchor kept, the next pass after it
    for k in sizes:
        toks = block[:k]

        def next_pass() -> None:
            nonlocal at
            at += 1
            tg.decode(toks, at, all_logits=True)

        tg.decode(toks, at, all_logits=True)
        res["rollback"][k] = ms(lambda: tg.rollback(at + 1, at, toks[:1]), next_pass)
        tg.rollback(at + 1, at, toks[:1])
        at += 1
    steps = calibrate.measure(tg, dr, dr.info.block_size, choices_for(dr.info.block_size - 1, 0))
    policy_step = {c.k: 1e3 * s for c, s in steps.items()}

    t_one = res["target_alone"][1] if 1 in sizes else None
    bound: dict[str, dict[int, dict[str, float]]] = {}
    for tau in (float(x) for x in a.tau.split(",") if x.strip()):
        profile = geometric(tau)
        bound[f"tau={tau:g}"] = {}
        for k in (k for k in sizes if k > 1 and t_one):
            cut = [sum(profile.hist[:n + 1]) for n in range(len(profile.hist))]  # P(accepted <= n)
            tau_k = 1 + sum(1 - cut[n] for n in range(k - 1))  # 1 + E[min(accepted, k - 1)]
            # a rollback where a draft is rejected; the injection of all k rows (at most what is accepted)
            cost = res["verify_capture"][k] + cut[k - 2] * res["rollback"][k] + res["draft"][k] + res["inject"][k]
            bound[f"tau={tau:g}"][k] = {"tau": tau_k, "speedup": tau_k * t_one / cost}

    doc = {
        **script_header("dflash-pass-costs/1"),
        "target": file_info(a.target) | {"arch": read_gguf_arch(a.target), "recurrent": tg.recurrent},
        "drafter": file_info(a.drafter) | {"n_layer": dr.info.n_layer, "block_size": dr.info.block_size,
                                           "target_layers": list(dr.info.target_layers)},
        "settings": {"context": a.context, "ctx_size": params.n_ctx, "sizes": sizes, "repeats": a.repeats,
                     "threads": tg.n_threads, "n_gpu_layers": a.n_gpu_layers, "device": a.device},
        "ms": res,
        "policy_step_ms": policy_step,
        "memory": memory,
        "bound_speedup": bound,
    }
    _print(doc)
    if a.json:
        write_json(doc, a.json)
        print(f"wrote {a.json}")
    plain.close()  # before tg, whose model it uses
    tg.close()
    dr.close()


def _print(doc: dict) -> None:
    res = doc["ms"]
    print(f"{doc['target']['name']} + {doc['drafter']['name']}, context {doc['settings']['context']}, "
          f"medians of {doc['settings']['repeats']} (ms)")
    cols = ("target_alone", "verify_capture", "verify_no_capture", "rollback", "draft", "inject")
    print(f"{'k':>3} " + " ".join(f"{c:>17}" for c in cols))
    for k in doc["settings"]["sizes"]:
        print(f"{k:>3} " + " ".join(f"{res[c][k]:17.3f}" if k in res[c] else f"{'':>17}" for c in cols))
    print("policy step (chain of k drafts): " + ", ".join(f"{k}: {v:.2f}" for k, v in doc["policy_step_ms"].items()))
    mem = {k: v for k, v in doc["memory"].items() if v is not None}
    print("memory: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in mem.items()))
    for name, by_k in doc["bound_speedup"].items():
        print(f"speedup bound, {name}: " + ", ".join(f"block {k}: {b['speedup']:.2f}x (tau {b['tau']:.2f})"
                                                   for k, b in by_k.items()))


if __name__ == "__main__":
    main()
