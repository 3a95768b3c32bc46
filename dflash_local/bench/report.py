"""Bench results as a rich table, a JSON document and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dflash_local.bench.runner import BenchResult, Totals

SCHEMA = "dflash-bench/1"


def speedup(t: Totals, base: Totals) -> float | None:
    return t.decode_tps / base.decode_tps if t.decode_tps and base.decode_tps else None


def bound(t: Totals, base: Totals) -> dict[str, float | None]:
    """What DFlash would run at with its tau and its passes' costs if nothing else took time: tau / (t(target, a
    pass) + t(drafter, a pass)) tokens a second, the drafter's pass being its block pass and its context injection;
    as a speedup, tau x t(target alone, a token) / (the same); our tokens a second as a fraction of it. All measured
    in the same run; None for the target alone and upstream (no breakdown)."""
    if t.mode != "dflash" or not t.passes or not t.t_target or t.tau is None:
        return {"drafter_ms_per_pass": None, "bound_tps": None, "bound_speedup": None, "fraction_of_bound": None}
    t_draft = (t.t_draft + t.t_inject) / t.passes
    bound_tps = t.tau / (t.t_target / t.passes + t_draft)
    t_one = base.t_target / base.passes if base.passes and base.t_target else None
    return {"drafter_ms_per_pass": 1e3 * t_draft, "bound_tps": bound_tps,
            "bound_speedup": bound_tps * t_one if t_one else None, "fraction_of_bound": t.decode_tps / bound_tps}


def run_dict(t: Totals, base: Totals) -> dict[str, object]:
    return {
        "key": t.key, "mode": t.mode, "block_size": t.block_size, "emulated_acceptance": t.emulated,
        "prompts": t.prompts,
        "prompt_tokens": t.prompt_tokens, "generated": t.generated, "passes": t.passes,
        "t_prefill": t.t_prefill, "t_decode": t.t_decode, "t_target": t.t_target, "t_draft": t.t_draft,
        "t_inject": t.t_inject, "t_capture": t.t_capture,
        "prefill_tps": t.prefill_tps, "decode_tps": t.decode_tps, "speedup": speedup(t, base), "tau": t.tau,
        "target_ms_per_pass": 1e3 * t.t_target / t.passes if t.passes and t.t_target else None,
        **bound(t, base),
        "accept_hist": t.hist, "shares": t.shares(), "error": t.error,
    }


def build_json(meta: dict[str, object], result: BenchResult, totals: dict[str, Totals]) -> dict[str, object]:
    base = totals["target"]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "memory": result.memory,
        "notes": result.notes,
        "runs": [run_dict(t, base) for t in totals.values()],
        "prompts": [{"id": r.id, "prompt_tokens": r.prompt_tokens, "runs": r.runs} for r in result.prompts],
        "emulation_seconds": result.emulation_seconds,
        "mismatches": [asdict(m) for m in result.mismatches],
        "ok": not result.failures,
    }


def write_json(doc: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def print_table(console: Console, doc: dict[str, object]) -> None:
    label = escape(f" [{doc['label']}]") if doc["label"] else ""
    table = Table(title=f"{doc['target']['name']} + {doc['drafter']['name']}: {doc['settings']['prompt_set']} "
                        f"x {doc['settings']['n_prompts']}, {doc['settings']['max_tokens']} tokens (greedy, "
                        f"{'adaptive' if doc['settings']['adaptive'] else 'fixed'} draft length){label}")
    # decode time shares: draft, target (capture included), inject, other; ms/pass: one target pass; bound: report.bound
    cols = ("run", "prefill t/s", "decode t/s", "speedup", "tau", "ms/pass", "bound t/s", "of bound",
            "draft", "target", "capture", "inject", "other")
    for col in cols:
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in doc["runs"]:
        if r["error"]:
            table.add_row(r["key"], "[red]failed[/red]", *[""] * (len(cols) - 2))
            continue
        table.add_row(r["key"], _num(r["prefill_tps"], ".1f"), _num(r["decode_tps"], ".1f"), _num(r["speedup"], ".2f"),
                      _num(r["tau"], ".2f"), _num(r["target_ms_per_pass"], ".1f"), _num(r.get("bound_tps"), ".1f"),
                      _pct(r.get("fraction_of_bound")),
                      *(_pct(r["shares"].get(k)) for k in ("draft", "target", "capture", "inject", "other")))
    console.print(table)
    for r in doc["runs"]:
        if r["accept_hist"]:
            counts = " ".join(f"{n}:{c}" for n, c in enumerate(r["accept_hist"]))
            console.print(f"[dim]{r['key']} passes by drafts accepted: {counts}[/dim]", highlight=False)
        if r["error"]:
            console.print(f"[red]{r['key']} failed:[/red] {escape(r['error'])}", highlight=False)
    m = doc["memory"]
    gpu = "" if m["gpu_used_mb"] is None else \
        f", GPU used {m['gpu_used_mb']:.0f} MiB device-wide (drafter {m['drafter_gpu_mb']:.0f})"
    console.print(f"peak RSS {m['peak_rss_mb']:.0f} MiB (drafter {m['drafter_rss_mb']:.0f}){gpu}", highlight=False)
    if doc.get("emulation_seconds"):
        console.print(f"[dim]emulated acceptance: {doc['emulation_seconds']:.2f} s in trial passes, taken off "
                      "DFlash's decode time[/dim]", highlight=False)
    for note in doc["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for mm in doc["mismatches"]:
        div = mm["divergence"]
        kind = "[yellow]rounding[/yellow]" if div["rounding"] else "[bold red]MISMATCH[/bold red]"
        why = "" if div["gap"] is None else f" (top-2 gap {div['gap']:.4g}, batch/one-token bound {div['bound']:.4g})"
        console.print(f"{kind} prompt {mm['prompt_id']} block {mm['block_size']}: token {mm['index']} is "
                      f"{mm['got']} with DFlash, {mm['expected']} with the target alone{why}", highlight=False)


def plot(doc: dict[str, object], path: Path) -> None:
    """Speedup and tau per block size, and the share of passes by drafts accepted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if r["block_size"] and not r["error"]]
    fig, (ax_s, ax_t, ax_h) = plt.subplots(1, 3, figsize=(15, 4.5))
    for mode, marker in (("dflash", "o"), ("llama.cpp", "s")):
        rs = [r for r in runs if r["mode"] == mode]
        if rs:
            bs = [r["block_size"] for r in rs]
            name = f"{mode} (emulated acceptance)" if rs[0].get("emulated_acceptance") else mode
            ax_s.plot(bs, [r["speedup"] or 0 for r in rs], marker=marker, label=name)
            ax_t.plot(bs, [r["tau"] or 0 for r in rs], marker=marker, label=name)
            if rs[0].get("bound_speedup"):
                ax_s.plot(bs, [r["bound_speedup"] or 0 for r in rs], marker=marker, linestyle=":",
                          label=f"{name}: bound")
    ax_s.axhline(1.0, color="grey", linestyle="--", label="target alone")
    for ax, label in ((ax_s, "decode speedup"), (ax_t, "tau (tokens per target pass)")):
        ax.set_xticks(doc["settings"]["block_sizes"])
        ax.set_xlabel("block size")
        ax.set_ylabel(label)
        ax.legend()
    for r in runs:
        if r["accept_hist"]:
            total = sum(r["accept_hist"]) or 1
            ax_h.plot(range(len(r["accept_hist"])), [c / total for c in r["accept_hist"]], marker=".",
                      label=f"block {r['block_size']}")
    ax_h.xaxis.get_major_locator().set_params(integer=True)
    ax_h.set_xlabel("drafts accepted per pass")
    ax_h.set_ylabel("share of passes")
    ax_h.legend()
    label = f"\n{doc['label']}" if doc["label"] else ""
    settings, machine = doc["settings"], doc["machine"]
    fig.suptitle(f"{doc['target']['name']} + {doc['drafter']['name']} ({settings['prompt_set']}, "
                 f"{'adaptive' if settings['adaptive'] else 'fixed'} draft length, "
                 f"{machine['gpus'][0] if machine['gpus'] else machine['cpu']}){label}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
