"""What every benchmark shares: a case description, timing, the machine's ceilings, the result
rows, the terminal table, the JSON file and the plots.

A benchmark module (bench/layer_norm.py, ...) yields `Case`s. A case is one problem (op,
direction, shape, dtype) with several implementations of it: the engine on each available
backend and the plain PyTorch a user would otherwise call. Every implementation is timed in the
same run (median of repeats), checked against the float64 reference, and turned into a `Row`.
"""
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

BASELINE = "torch eager"


@dataclass
class Case:
    op: str                      # "layer_norm"
    direction: str               # "fwd" or "fwd+bwd"
    shape: str                   # "8192x768"
    dtype: torch.dtype
    implementations: dict        # name -> zero-argument callable returning the output to check
    expected: Callable[[], torch.Tensor]  # the float64 reference of that output (computed lazily)
    bytes_moved: Optional[int] = None     # what must cross memory once (formula at the case)
    flops: Optional[int] = None           # floating-point operations (formula at the case)
    sweep: dict = field(default_factory=dict)  # x-axis values for plots, e.g. {"width": 768}
    baseline: str = BASELINE     # the implementation speedups are measured against
    unchecked: tuple = ()        # implementations timed for comparison only (a different op)
    threads: Optional[int] = None  # torch.set_num_threads for this case only (None: the run's setting)
    repeats: Optional[int] = None  # timed samples for this case only (None: the run's setting); for
                                   # cases whose one call takes seconds (bf16 models on a CPU)


@dataclass
class Row:
    op: str
    direction: str
    shape: str
    dtype: str
    implementation: str
    median_ms: float
    gb_per_s: Optional[float]
    pct_of_copy: Optional[float]
    tflop_per_s: Optional[float]
    pct_of_matmul: Optional[float]
    speedup: Optional[float]      # baseline time / this time
    max_error: Optional[float]    # max |output - float64 reference|
    sweep: dict
    extra: dict = field(default_factory=dict)


def implemented(op: str, names: list[str]) -> list[str]:
    """The backends among `names` that have an implementation of engine op `op`."""
    from engine import backends

    return [name for name in names if name in backends.ops().get(op, ())]


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with dynamo's caches reset first, so that each case compiles its own
    graphs for its own shapes and dtypes (and no earlier case's recompile limit applies)."""
    torch._dynamo.reset()
    return torch.compile(fn)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls_per_sample(fn: Callable, device: torch.device, min_sample_s: float) -> int:
    """Calls batched into one timed sample so that it lasts >= min_sample_s (timer resolution,
    launch noise); the first call also warms up (allocations, caches, lazy builds)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-7)))


def _sample(fn: Callable, device: torch.device, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def median_seconds(fns: dict, device: torch.device, repeats: int, min_sample_s: float = 2e-3) -> dict:
    """Median wall time of one call of each function. Samples of the functions are interleaved
    (round-robin, rotating the order), so that a machine whose speed drifts during the run (a
    shared VM) affects all of them alike and their ratios stay honest."""
    calls = {name: _calls_per_sample(fn, device, min_sample_s) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        # rotate the order each round: what ran just before (and what it left in the caches)
        # differs from round to round instead of always favouring the same implementation
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            samples[name].append(_sample(fns[name], device, calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Ceilings:
    copy_gb_per_s: float        # bytes read + written per second by a large tensor copy
    matmul_tflop_per_s: float   # fp32 (CPU) / fp16 (GPU) square matmul rate
    copy_bytes: int
    matmul_size: int


def measure_ceilings(device: torch.device, quick: bool) -> Ceilings:
    """The machine's measured limits that op results are reported against."""
    # Copy: 256 MiB (64 MiB quick) each way, well beyond the last-level cache, so that the copy
    # streams from and to DRAM. GB/s counts the bytes read plus the bytes written.
    numel = (16 if quick else 64) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds({"copy": lambda: dst.copy_(src)}, device, repeats=5 if quick else 15)["copy"]
    copy_bytes = 2 * src.numel() * src.element_size()
    # Matmul: n x n by n x n, 2 * n^3 flops.
    n = 1024 if quick or device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_seconds = median_seconds({"mm": lambda: torch.mm(a, b)}, device, repeats=5 if quick else 15)["mm"]
    return Ceilings(copy_bytes / seconds / 1e9, 2 * n**3 / mm_seconds / 1e12, copy_bytes, n)


def max_error(output, expected: torch.Tensor) -> float:
    return (output.detach().double() - expected).abs().max().item() if expected.numel() else 0.0


def run_case(case: Case, device: torch.device, ceilings: Ceilings, repeats: int) -> list[Row]:
    """Times and checks every implementation of one case; speedups against case.baseline."""
    expected = case.expected()
    errors = {name: None if name in case.unchecked else max_error(fn(), expected)
              for name, fn in case.implementations.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(case.threads or threads)
    try:
        times = median_seconds(case.implementations, device, case.repeats or repeats)
    finally:
        torch.set_num_threads(threads)
    base = times.get(case.baseline)
    rows = []
    for name, seconds in times.items():
        error = errors[name]
        gbs = case.bytes_moved / seconds / 1e9 if case.bytes_moved else None
        tflops = case.flops / seconds / 1e12 if case.flops else None
        rows.append(Row(
            op=case.op, direction=case.direction, shape=case.shape, dtype=str(case.dtype).removeprefix("torch."),
            implementation=name, median_ms=seconds * 1e3,
            gb_per_s=gbs, pct_of_copy=100 * gbs / ceilings.copy_gb_per_s if gbs else None,
            tflop_per_s=tflops, pct_of_matmul=100 * tflops / ceilings.matmul_tflop_per_s if tflops else None,
            speedup=base / seconds if base else None, max_error=error, sweep=case.sweep))
    return rows


def parity_lines(rows: list[Row], ops: tuple, goal: float = 1.0) -> list[str]:
    """Issue 12's "every row" targets for the cases of `ops`: the engine's fastest backend other than
    reference against torch eager, and against torch.compile where the case timed it. One line per
    comparison: how many cases meet `goal`, and which do not, with their ratios."""
    cases: dict = {}
    for r in rows:
        if r.op in ops:
            cases.setdefault((r.op, r.direction, r.shape, r.dtype), {})[r.implementation] = r
    lines = []
    for other in (BASELINE, "torch.compile"):
        met, short = 0, []
        for key, group in cases.items():
            engine = [r for name, r in group.items() if name.startswith("engine:") and name != "engine:reference"]
            if not engine or other not in group:
                continue
            best = min(engine, key=lambda r: r.median_ms)
            ratio = group[other].median_ms / best.median_ms
            if ratio >= goal:
                met += 1
            else:
                short.append(f"{' '.join(key)} {ratio:.2f}x")
        if met or short:
            lines.append(f"{'/'.join(ops)}: engine >= {goal}x {other} in {met} of {met + len(short)} cases"
                         + (f"; below: {', '.join(short)}" if short else ""))
    return lines


class Progress:
    """One status line on stderr, rewritten in place: [done/total] what is running."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.interactive = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {label}"
        if self.interactive:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.interactive:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = ["op", "dir", "shape", "dtype", "implementation", "ms", "GB/s", "%copy", "TFLOP/s", "%mm",
              "speedup", "max err"]
    lines = [[r.op, r.direction, r.shape, r.dtype, r.implementation, _fmt(r.median_ms, ".3f"),
              _fmt(r.gb_per_s, ".1f"), _fmt(r.pct_of_copy, ".0f"), _fmt(r.tflop_per_s, ".3f"),
              _fmt(r.pct_of_matmul, ".0f"), _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
              _fmt(r.max_error, ".1e")] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    previous = None
    for row, line in zip(rows, lines):
        key = (row.op, row.direction, row.shape, row.dtype)
        if previous is not None and key[:2] != previous[:2]:
            out.append("")
        previous = key
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    return "\n".join(out)


def write_json(path: Path, rows: list[Row], ceilings: Ceilings, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "ceilings": asdict(ceilings), "rows": [asdict(r) for r in rows]},
                               indent=1))


def plot(rows: list[Row], out_dir: Path, x_key: str, y_attr: str, y_label: str) -> list[Path]:
    """One PNG per (op, direction, dtype) that has a sweep over x_key: y_attr vs x per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if x_key in r.sweep and getattr(r, y_attr) is not None:
            groups.setdefault((r.op, r.direction, r.dtype), []).append(r)
    written = []
    for (op, direction, dtype), group in groups.items():
        by_impl: dict = {}
        for r in group:
            by_impl.setdefault(r.implementation, []).append((r.sweep[x_key], getattr(r, y_attr)))
        if all(len(points) < 2 for points in by_impl.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, points in sorted(by_impl.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_label)
        ax.set_title(f"{op} {direction} ({dtype})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{op}_{direction.replace('+', '_')}_{dtype}_{y_attr}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
