"""python -m bench: time every op on every available backend against plain PyTorch.

    python -m bench                    all ops, full sweep (this machine's CPU unless a GPU is present)
    python -m bench --quick            a short run: fewer shapes and repeats
    python -m bench --ops layer_norm   only these ops (comma-separated)
    python -m bench --gpu-readiness    the GPU compile table instead: kernel x target x resources

First measures the machine's ceilings (copy bandwidth, matmul rate), then every case; prints a
table and the issue targets, writes <out>/results.json and <out>/plots/*.png.
"""
import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import harness
from engine import backends

# glibc hands large freed blocks back to the OS and page-faults them in again at the next
# allocation (over 10 ms per 25 MB output on this VM), which would swamp every implementation's
# time alike. PyTorch's CPU tuning guide recommends a caching allocator for this; we ask glibc to
# keep freed memory instead (blocks up to 32 MiB from the heap, never trimmed). Tunables are read
# at process start, so main() re-executes itself once with them set.
ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"

# op group name -> bench module (each has cases(device, quick, backends) and targets(rows, ceilings))
SUITES = {"layer_norm": "bench.layer_norm", "attention": "bench.attention", "linear": "bench.linear",
          "rotary": "bench.rotary", "models": "bench.models", "dispatch": "bench.dispatch",
          "cross_entropy": "bench.cross_entropy"}
# plots: (sweep key on the x axis, row attribute on the y axis, y label)
PLOTS = [("width", "gb_per_s", "GB/s (bytes that must move / time)"),
         ("seq_len", "tflop_per_s", "TFLOP/s (FLOPs formula in bench/attention.py)"),
         ("batch", "gb_per_s", "GB/s (cache bytes read / time)"),
         ("rows", "tflop_per_s", "TFLOP/s (FLOPs formula in bench/linear.py)"),
         ("numel", "gb_per_s", "GB/s (bytes that must move / time)")]


def engine_backends(device: torch.device) -> list[str]:
    """Backends to time on this device: those that run here for real (the Triton interpreter is a
    correctness tool, not something to time)."""
    names = []
    for name in backends.BACKENDS:
        state = backends.status(name)
        if state.available and device.type in state.devices and not (name == "triton" and device.type == "cpu"):
            names.append(name)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated, from: {', '.join(SUITES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and plots/")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per measurement")
    parser.add_argument("--gpu-readiness", action="store_true",
                        help="compile every kernel for sm80/sm90/gfx942 and print registers, shared memory, spills")
    args = parser.parse_args(argv)
    if "GLIBC_TUNABLES" not in os.environ and argv is None:
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]],
                  {**os.environ, "GLIBC_TUNABLES": ALLOCATOR_TUNABLES})

    if args.gpu_readiness:
        from engine import readiness

        reports = readiness.run_all()
        print(readiness.format_table(reports))
        return 1 if readiness.problems(reports) else 0

    unknown = [op for op in args.ops.split(",") if op not in SUITES]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(SUITES)}")
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 15)
    names = engine_backends(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({where}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; engine backends timed: {', '.join(names)}")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
    for name, state in backends.available().items():
        if name not in names:
            print(f"  not timed: {name}: {state.reason}")

    ceilings = harness.measure_ceilings(device, args.quick)
    print(f"ceilings: copy {ceilings.copy_gb_per_s:.1f} GB/s (read + write of {ceilings.copy_bytes / 2**20:.0f} MiB), "
          f"matmul {ceilings.matmul_tflop_per_s:.3f} TFLOP/s ({ceilings.matmul_size}^3)")

    suites = [importlib.import_module(SUITES[op]) for op in args.ops.split(",")]
    cases = [case for suite in suites for case in suite.cases(device, args.quick, names)]
    progress = harness.Progress(len(cases))
    rows = []
    started = time.perf_counter()
    for case in cases:
        progress.step(f"{case.op} {case.direction} {case.shape} {str(case.dtype).removeprefix('torch.')}")
        rows += harness.run_case(case, device, ceilings, repeats)
    progress.close()

    print(harness.format_table(rows))
    target_lines = [line for suite in suites for line in suite.targets(rows, ceilings)]
    if target_lines:
        print("\ntargets:")
        for line in target_lines:
            print("  " + line)

    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "quick": args.quick, "repeats": repeats,
            "seconds": round(time.perf_counter() - started, 1), "argv": sys.argv[1:],
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    harness.write_json(out / "results.json", rows, ceilings, meta)
    if importlib.util.find_spec("matplotlib") is None:  # a bare GPU image may lack it; the numbers are written
        print(f"\nwrote {out / 'results.json'}; no plots: matplotlib is not installed")
        return 0
    plots = [path for x_key, y_attr, label in PLOTS for path in harness.plot(rows, out / "plots", x_key, y_attr, label)]
    print(f"\nwrote {out / 'results.json'} and {len(plots)} plots in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
