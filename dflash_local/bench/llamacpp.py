"""Upstream llama.cpp's own DFlash on the same prompts: `llama-speculative-simple --spec-type
draft-dflash` (built by bench/build_llama_cpp.sh from the same vendored llama.cpp), one process per
prompt and block size, its timings and acceptance parsed from its log.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from rich.console import Console

from dflash_local.bench.runner import BenchConfig, PromptRecord, Totals, progress_bar
from dflash_local.errors import UserError
from dflash_local.native import cpu_has_amx

BINARY = "llama-speculative-simple"
_PATTERNS = {
    "encoded": r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds",
    "decoded": r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds",
    "n_accept": r"n_accept\s*=\s*(\d+)",
}


def find_binary(path: Path) -> Path:
    """PATH is the binary itself or a folder holding it (directly, in bin/ or in build/bin/)."""
    for cand in (path, path / BINARY, path / "bin" / BINARY, path / "build" / "bin" / BINARY):
        if cand.is_file():
            return cand
    raise UserError(f"no {BINARY} at {path}: build it with bench/build_llama_cpp.sh")


def command(binary: Path, cfg: BenchConfig, block_size: int, prompt: str, n_threads: int) -> list[str]:
    """The upstream run of one prompt; n_threads: as many as our target used (the defaults differ)."""
    p = cfg.params
    drafter_on_gpu = bool(cfg.device) and cfg.device.upper() != "CPU"  # our helper's default device is the CPU
    cmd = [str(binary), "-m", str(cfg.target), "-md", str(cfg.drafter), "--spec-type", "draft-dflash",
           "--spec-draft-n-max", str(block_size - 1), "-n", str(cfg.max_tokens), "-c", str(p.n_ctx),
           "-b", str(p.n_ctx), "-ngl", str(p.n_gpu_layers), "-ngld", "99" if drafter_on_gpu else "0",
           "-t", str(n_threads), "-td", str(n_threads), "--temp", "0", "--top-k", "1", "-fit", "off",
           "-p", prompt]  # -p: -f would drop a final newline
    if cpu_has_amx():  # the AMX repacked buffers crash ggml's matmul here as in our process
        cmd.append("--no-repack")
    return cmd


def parse(log: str) -> dict[str, float]:
    """Prompt/decoded token counts and seconds, and accepted drafts, from the program's log."""
    out: dict[str, float] = {}
    for name, pattern in _PATTERNS.items():
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no '{name}' line in the output")
        out[name] = float(m.group(1))
        if m.lastindex == 2:
            out[f"t_{name}"] = float(m.group(2))
    return out


def failure_reason(stderr: str) -> str:
    """What a failed run said of why: its assertion or error line (the backtrace after it names only addresses),
    else its last lines."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "GGML_ASSERT" in line or "error" in line.lower() or "failed" in line.lower():
            return line
    return " | ".join(lines[-3:])


def run_upstream(binary: Path, cfg: BenchConfig, records: list[PromptRecord], n_threads: int,
                 console: Console) -> dict[str, Totals]:
    """A Totals per block size; a failing run stops that block size and keeps the error."""
    totals: dict[str, Totals] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("llama.cpp", total=len(records) * len(cfg.block_sizes))
        for b in cfg.block_sizes:
            t = totals[f"llama.cpp-{b}"] = Totals("llama.cpp", b)
            for rec in records:
                progress.update(task, description=f"llama.cpp {rec.id}")
                proc = subprocess.run(command(binary, cfg, b, rec.text, n_threads), capture_output=True, text=True,
                                      errors="replace")
                try:
                    if proc.returncode != 0:
                        raise ValueError(f"exit code {proc.returncode}")
                    r = parse(proc.stdout + proc.stderr)
                except ValueError as e:
                    t.error = f"{rec.id}: {e}: {failure_reason(proc.stderr)}"
                    break
                t.prompts += 1
                t.prompt_tokens += int(r["encoded"])
                t.generated += int(r["decoded"])
                t.t_prefill += r["t_encoded"]
                t.t_decode += r["t_decoded"]
                t.accepted += int(r["n_accept"])
                t.passes += int(r["decoded"] - r["n_accept"])  # each pass yields its accepted drafts + 1
                rec.runs[t.key] = {"generated": int(r["decoded"]), "decode_tps": r["decoded"] / r["t_decoded"],
                                   "matches_target": rec.target_text in proc.stdout}
                progress.advance(task)
            progress.advance(task, len(records) - t.prompts if t.error else 0)
    return totals
