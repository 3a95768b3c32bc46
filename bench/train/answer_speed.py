"""Speed of the target answering training prompts in parallel (`dflash train --parallel N`): greedy decode steps
of one token for each of N sequences in one batch (ascending ids, as the data phase sends them), each after a
prompt of --context tokens. Prints tokens/s per N.

--sampler backend picks each token with llama.cpp's backend greedy sampler (an experimental API: the argmax runs
in the graph, on the GPU with the model, and no logits come back to the host) instead of numpy's argmax of the
logits, which the data phase uses: a measure of what the 49,152 logits per sequence and step cost on a GPU.

    python bench/train/answer_speed.py TARGET.gguf [--parallel 1,8,32] [--context 16] [--threads N] [--n-gpu-layers N]
        [--seconds 5] [--sampler host|backend]
"""

from __future__ import annotations

import argparse
import time

import llama_cpp as lc

from dflash_local.target import Target, TargetParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--parallel", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--context", type=int, default=16, help="prompt tokens before the timed steps")
    ap.add_argument("--sampler", choices=("host", "backend"), default="host")
    a = ap.parse_args()
    for n in map(int, a.parallel.split(",")):
        t = Target(a.target, TargetParams(n_ctx=a.context + 512, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers,
                                          n_seq=n))
        if a.sampler == "backend":  # a greedy chain per sequence, alive as long as the context
            chains = [lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params()) for _ in range(n)]
            for s, chain in enumerate(chains):
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
                if not lc.llama_set_sampler(t.ctx, s, chain):
                    raise SystemExit("llama.cpp did not take the backend sampler")
        prompt = (t.tokenize("def f(x):\n    return x * 2\n" * (a.context // 8 + 1)))[:a.context]
        for s in range(n):
            t.decode(prompt, 0, all_logits=False, seq=s)
        pos, steps, seqs = len(prompt), 0, list(range(n))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < a.seconds and pos < t.n_ctx:
            if a.sampler == "backend":
                t._run([42] * n, [pos] * n, seqs, [True] * n)
                [lc.llama_get_sampled_token_ith(t.ctx, i) for i in range(n)]
            else:
                t.step([42] * n, [pos] * n, seqs)
                t.logits(n).argmax(axis=1)
            pos, steps = pos + 1, steps + 1
        dt = time.perf_counter() - t0
        print(f"parallel {n:3d}, context {a.context}, {a.sampler} sampler: {steps * n / dt:8.1f} tok/s  "
              f"({dt / steps * 1000:.1f} ms per step)", flush=True)
        t.close()


if __name__ == "__main__":
    main()
