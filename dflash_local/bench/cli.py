"""`dflash bench`: registered on the main app by dflash_local/cli.py; heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from dflash_local.draft_length import EXPLORE_SHARE
from dflash_local.model_registry import DEFAULT_MODEL
from dflash_local.tree import TREE_SIZE


POLICY = ("adaptive: step costs calibrated before the first step (cached), acceptance learnt as the run goes from "
          f"what earlier runs cached, tries of choices not known to pay within {EXPLORE_SHARE:.0%} of the decode time "
          "times what they could win (up to all of it)")


def bench(
    target: str = typer.Argument(None, help=f"Target GGUF, or a built-in model's name (`dflash models`; default: "
                                 f"{DEFAULT_MODEL}, with its shipped drafter)."),
    drafter: Path = typer.Option(None, "--drafter", "-d", help="DFlash drafter GGUF (default: <target>-dflash*.gguf "
                                 "next to the target, or the one shipped for it)."),
    prompts: str = typer.Option("humaneval", "--prompts", help="humaneval, chat, or a .jsonl/.txt file."),
    n_prompts: int = typer.Option(64, "-n", "--n-prompts", min=1, help="Use the first N prompts."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    block_sizes: str = typer.Option("4,8,16", "--block-sizes", help="Comma-separated draft block sizes."),
    adaptive: bool = typer.Option(True, "--adaptive/--fixed", help="Draft length chosen per step by measured "
                                  "speed, as `dflash run` does (the block size is its maximum), or always "
                                  "the whole block (shows what verification costs per block size)."),
    tree_size: int = typer.Option(TREE_SIZE, "--tree-size", min=0, max=TREE_SIZE, help="The most drafts of a "
                                  "tree of drafts; 0: one chain."),
    chat_template: bool = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap prompts in the "
                                       "target's chat template (default: raw completion for humaneval, else on)."),
    json_out: Path = typer.Option(None, "--json", help="Write the results as JSON."),
    plot_out: Path = typer.Option(None, "--plot", help="Write a PNG plot."),
    compare_llama_cpp: Path = typer.Option(None, "--compare-llama-cpp", help="Upstream llama-speculative-simple, "
                                           "or its folder (bench/build_llama_cpp.sh): add its DFlash runs."),
    label: str = typer.Option(None, "--label", help="A note stored with the results (e.g. 'random drafter')."),
    emulate: str = typer.Option(None, "--emulate-acceptance", metavar="PROFILE", help="Emulate a drafter that "
                                "accepts as PROFILE says (tau=X: geometric with mean X; a JSON histogram as in "
                                "bench/profiles/, or a bench result): the drafter runs, its drafts become the target's "
                                "own text cut at a drawn length. Chains only."),
    ctx_size: int = typer.Option(4096, "--ctx-size", "-c", min=16),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", help="Target layers to offload to the GPU."),
    threads: int = typer.Option(0, "--threads", "-t", min=0, help="CPU threads (0: the cores this process may use)."),
    device: str = typer.Option(None, "--device", help="ggml device for the drafter (CPU, CUDA0, ...)."),
) -> None:
    """Benchmark DFlash against the target alone (greedy, same prompts, one process); fails if outputs differ."""
    import shlex
    import sys

    from dflash_local import models
    from dflash_local.bench import machine, report
    from dflash_local.bench.emulate import load_profile
    from dflash_local.bench.prompts import load_prompts
    from dflash_local.bench.runner import BenchConfig, Mismatch, run_bench
    from dflash_local.console import command_errors
    from dflash_local.console import console as err
    from dflash_local.errors import UsageError, UserError
    from dflash_local.target import TargetParams, read_gguf_arch

    out = Console(width=None if sys.stdout.isatty() else 150)  # a file or pipe gets every column whole

    def on_mismatch(m: Mismatch) -> None:
        kind = "[yellow]rounding[/yellow]" if m.divergence and m.divergence.rounding else "[bold red]MISMATCH[/bold red]"
        err.print(f"{kind} prompt {m.prompt_id}, block {m.block_size}, token {m.index}", highlight=False)

    with command_errors():
        path = models.resolve_target(target)
        drafter = drafter or models.find_drafter(path)
        if drafter is None:
            raise UserError(f"no drafter given and none found for {path.name}: pass --drafter")
        try:
            sizes = sorted({int(b) for b in block_sizes.split(",")})
        except ValueError:
            raise UsageError(f"--block-sizes must be comma-separated integers, not {block_sizes!r}") from None
        profile = None
        if emulate is not None:
            if compare_llama_cpp is not None:
                raise UsageError("--emulate-acceptance and --compare-llama-cpp do not go together: upstream's drafts "
                                 "cannot be emulated")
            profile = load_profile(emulate)
            tree_size = 0  # chains only
            label = "; ".join(filter(None, [label, f"emulated acceptance {profile.name} (tau {profile.tau:.2f})"]))
        binary = None
        if compare_llama_cpp is not None:
            from dflash_local.bench.llamacpp import find_binary, run_upstream

            binary = find_binary(compare_llama_cpp)
        cfg = BenchConfig(path, drafter, load_prompts(prompts, n_prompts, chat_template), max_tokens, sizes,
                          TargetParams(n_ctx=ctx_size, n_gpu_layers=n_gpu_layers, n_threads=threads), device,
                          adaptive, tree_size, profile)
        result = run_bench(cfg, err, on_mismatch)
        totals = dict(result.totals)
        if binary is not None:
            totals |= run_upstream(binary, cfg, result.prompts, result.n_threads, err)

    meta = {
        "label": label,
        "command": shlex.join(["dflash", *sys.argv[1:]]),
        "machine": machine.machine_info(),
        "git": machine.git_commit(),
        "target": machine.file_info(path) | {"arch": read_gguf_arch(path)},
        "drafter": machine.file_info(drafter) | result.drafter,
        "settings": {"prompt_set": prompts, "n_prompts": len(cfg.prompts), "max_tokens": max_tokens,
                     "block_sizes": sizes, "adaptive": adaptive, "tree_size": tree_size,
                     "policy": POLICY if adaptive else "fixed: every step verifies the whole block, a tree where there "
                                                       "is one", "chat_template": cfg.prompts[0].chat,
                     "greedy": True,
                     "ctx_size": ctx_size, "n_gpu_layers": n_gpu_layers, "threads": threads,
                     "threads_used": result.n_threads, "device": device,
                     "llama_cpp_binary": str(binary) if binary else None,
                     "emulated_acceptance": profile.as_dict() if profile else None},
    }
    doc = report.build_json(meta, result, totals)
    report.print_table(out, doc)
    if json_out:
        report.write_json(doc, json_out)
        err.print(f"wrote {json_out}", highlight=False)
    if plot_out:
        report.plot(doc, plot_out)
        err.print(f"wrote {plot_out}", highlight=False)
    if result.failures:
        ids = sorted({m.prompt_id for m in result.failures})
        err.print(f"[bold red]FAILED:[/bold red] DFlash output differs from the target's own greedy output, beyond "
                  f"rounding, on {len(ids)} prompt(s): {', '.join(ids)}", highlight=False)
        raise typer.Exit(1)
