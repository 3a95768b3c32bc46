"""What a tree step's injection costs, two ways side by side in one process: the accepted path's rows interleaved on
the host and regrouped by the drafter (`Drafter.inject(Target.features()[path])`, the engine's way before cf2b732)
against picked out of each layer's rows where the capture left them (`Target.inject_path`, its way since). Each
repeat decodes the same tree-sized pass of --rows tokens first, so that both read freshly captured rows; the times are
of the injection call alone, medians of --repeats after one warm-up each.

    python -P bench/path_injection.py TARGET DRAFTER [--rows 63] [--path 0,1,5,9] [--repeats 10] [--threads N]
        [--n-gpu-layers N] [--device CUDA0] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp as lc  # noqa: F401  first: numpy loaded before llama.cpp's libraries crashed its model load on GPUs

import json

from dflash_local.bench.machine import script_header
from dflash_local.bench.timing import side_by_side_ms, side_by_side_parser
from dflash_local.native import Drafter
from dflash_local.target import Target, TargetParams


def main() -> None:
    ap = side_by_side_parser()
    ap.add_argument("--rows", type=int, default=63, help="tokens of the pass (a tree of 62 and its anchor)")
    ap.add_argument("--path", default="0,1,5,9", help="the accepted path's rows")
    a = ap.parse_args()
    path = [int(r) for r in a.path.split(",")]
    params = TargetParams(n_ctx=2 * a.rows + 64, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers)
    dr = Drafter(a.drafter, a.target, device=a.device, n_ctx=params.n_ctx, n_threads=a.threads)
    tg = Target(a.target, params, capture_layers=dr.info.target_layers)
    tokens = (tg.tokenize("def f(x):\n    return [i * x for i in range(10)]\n", add_special=False) * a.rows)[:a.rows]
    ways = {"interleaved": lambda: dr.inject(tg.features()[path], 0), "gathered": lambda: tg.inject_path(dr, path, 0)}

    def prepare(_: str) -> None:
        tg.clear()
        dr.crop(0)
        tg.decode(tokens, 0, all_logits=False)

    ms, medians, _ = side_by_side_ms(ways, prepare, a.repeats)
    print(f"{a.target.name} + {a.drafter.name} ({tg.capture_method}), {a.rows} rows, path {path}: "
          + ", ".join(f"{way} {m:.3f} ms" for way, m in medians.items()))
    if a.json:
        a.json.write_text(json.dumps(script_header("dflash-path-injection/1") | {
            "capture": tg.capture_method, "rows": a.rows, "path": path, "repeats": a.repeats, "ms": ms,
            "median_ms": medians}, indent=1))
    tg.close()
    dr.close()


if __name__ == "__main__":
    main()
