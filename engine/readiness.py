"""GPU readiness: compile every kernel for real GPU targets on a machine without a GPU, and report
what each compiled kernel uses (registers, shared memory, spills, local memory, tensor cores).

Triton: every module of the `kernels` package that defines `gpu_compile_cases()` contributes its
`GpuCompileCase`s. Each case is compiled for sm80, sm90 and gfx942 through the kernel's own
`warmup`, the path a real launch takes (argument specialization included), under a stand-in
driver that only names the target.
CUDA C++: every csrc/cuda/*.cu is compiled by nvcc for sm_80 and sm_90a.

    python -m engine.readiness [--json] [--kernels NAME_SUBSTRING]

exits non-zero when any kernel fails to compile, spills, uses local memory or asks for more shared
memory than the target has, and when no kernel is found (a filter that matches none). Kernels
defined while TRITON_INTERPRET=1 is set are interpreter objects that cannot be compiled, so this
must run with it unset; `run_all` re-runs itself in a subprocess when it is set (as it is under
the test suite).
Extra kernel modules (for example a toy kernel outside the repository) can be added with
ENGINE_READINESS_MODULES=mod1,mod2 or run_all(extra_modules=[...]).
"""
import argparse
import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# GPUTarget arguments by report name (the GPUTarget itself is made when compiling, so that
# importing this module does not import triton).
TARGET_SPECS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}

# Shared memory one block may use on each target (the opt-in maximum of A100, H100, MI300X, net
# of the 1 KB the driver reserves per block, which the reports leave out too). A real launch fails
# above it; an ahead-of-time compile does not check it, so we do.
SHARED_LIMIT = {"sm80": 166912, "sm90": 232448, "gfx942": 65536}

# nvcc flags per target. sm90 is built as sm_90a because wgmma exists only there. We use the
# -gencode form (what TORCH_CUDA_ARCH_LIST=9.0a gives) rather than -arch=sm_90a: with nvcc 13,
# -arch=sm_90a also embeds compute_90 PTX and runs ptxas on it, which rejects wgmma unless the
# source guards it with __CUDA_ARCH_FEAT_SM90_ALL.
NVCC_ARCH = {
    "sm80": ["-gencode", "arch=compute_80,code=sm_80"],
    "sm90": ["-gencode", "arch=compute_90a,code=sm_90a"],
}

# Tensor-core matrix products. In SASS, HMMA/IMMA/DMMA are the warp-level mma and the *GMMA ones
# the warpgroup wgmma of sm90. In PTX they are mma.sync (wmma.mma.sync from nvcuda::wmma) and
# wgmma.mma_async; ptxas turns each into the SASS above.
SASS_WGMMA = re.compile(r"\b[HIQB]GMMA\b")
SASS_MMA = re.compile(r"\b(?:[HID]MMA|[HIQB]GMMA)\b")
PTX_WGMMA = re.compile(r"\bwgmma\.mma_async")
PTX_MMA = re.compile(r"\b(?:w?mma(?:\.mma)?\.sync|wgmma\.mma_async)")
AMD_MFMA = re.compile(r"\bv_s?mfma")


@dataclass
class KernelReport:
    kernel: str                 # case name (Triton) or "file.cu:function" (CUDA)
    config: str                 # launch options and constexprs, or the nvcc arch flags
    target: str                 # sm80 / sm90 / gfx942
    registers: int | None = None      # per thread (CUDA) or VGPRs per lane (AMD)
    shared_bytes: int | None = None   # per block: dynamic (Triton's request) + static
    spill_bytes: int | None = None    # spill stores + loads (CUDA); 4 x spilled registers (AMD)
    local_bytes: int | None = None    # stack frame / scratch per thread
    uses_mma: bool | None = None      # any tensor-core matrix instruction (HMMA, HGMMA, MFMA)
    uses_wgmma: bool | None = None    # warpgroup mma (sm90 only; None where it does not exist)
    error: str | None = None          # compile failure: the kernel is not ready
    skipped: str | None = None        # not checked, and why (e.g. nvcc not found): not a failure
    source: str = "triton"            # "triton" or "cuda"
    module: str = ""                  # kernels module or .cu file the kernel comes from
    expects_tensor_cores: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)  # target-specific extras (sgprs, barriers, ...)

    def problems(self) -> list[str]:
        """What keeps this kernel from being ready on its target (empty when ready)."""
        if self.skipped:
            return []
        if self.error:
            # the last line says what went wrong (compiler errors quote the source first)
            lines = [line for line in self.error.splitlines() if line.strip()] or ["failed"]
            return [f"error: {lines[-1].strip()}"]
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B")
        if self.local_bytes:
            found.append(f"local memory {self.local_bytes} B")
        limit = SHARED_LIMIT.get(self.target)
        if limit is not None and self.shared_bytes is not None and self.shared_bytes > limit:
            found.append(f"shared {self.shared_bytes} B > {limit} B")
        if self.expects_tensor_cores and not self.tensor_cores_ok():
            found.append("no tensor-core instructions")
        return found

    def tensor_cores_ok(self) -> bool:
        """Whether the best tensor-core instruction of the target is used: wgmma on sm90,
        mma on sm80 and MFMA on gfx942."""
        return bool(self.uses_wgmma) if self.target == "sm90" else bool(self.uses_mma)


# ----------------------------------------------------------------------------------------------
# Parsing tool output (shared by the Triton and the nvcc paths)
# ----------------------------------------------------------------------------------------------

def parse_ptxas_log(log: str) -> dict[str, dict]:
    """`ptxas -v` output -> {entry function: {registers, spill_stores, spill_loads, stack_bytes,
    shared_bytes, barriers}}. Non-entry functions (noinline device functions) are folded into
    the entry functions' totals: a spill there is a spill of the kernel that calls it."""
    entries, others, current = {}, {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = entries.setdefault(m.group(1), dict(registers=0, spill_stores=0, spill_loads=0,
                                                          stack_bytes=0, shared_bytes=0, barriers=0))
        elif m := re.search(r"Function properties for (\S+)", line):
            # properties of an entry function follow its "Compiling" line; others stand alone
            name = m.group(1)
            current = entries.get(name) or others.setdefault(
                name, dict(spill_stores=0, spill_loads=0, stack_bytes=0))
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                            line):
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["shared_bytes"] = int(s.group(1))
            if b := re.search(r"used (\d+) barriers", line):
                current["barriers"] = int(b.group(1))
            if lm := re.search(r"(\d+) bytes lmem", line):  # older ptxas report local arrays here
                current["stack_bytes"] += int(lm.group(1))
    for usage in entries.values():
        for other in others.values():
            usage["spill_stores"] += other["spill_stores"]
            usage["spill_loads"] += other["spill_loads"]
    return entries


def split_sass(sass: str) -> dict[str, str]:
    """`cuobjdump -sass` output -> {function name: its SASS}."""
    functions, name = {}, None
    for line in sass.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


def parse_amdgcn(asm: str) -> dict:
    """The AMDGPU metadata block at the end of Triton's amdgcn: registers, LDS, scratch, spills."""
    def field_of(key):
        m = re.search(rf"^\s+\.{key}:\s+(\d+)", asm, re.M)
        return int(m.group(1)) if m else 0
    return dict(vgpr_count=field_of("vgpr_count"), sgpr_count=field_of("sgpr_count"),
                agpr_count=field_of("agpr_count"), vgpr_spill_count=field_of("vgpr_spill_count"),
                sgpr_spill_count=field_of("sgpr_spill_count"),
                lds_bytes=field_of("group_segment_fixed_size"),
                scratch_bytes=field_of("private_segment_fixed_size"))


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def _cuobjdump() -> str:
    """Triton's wheel ships cuobjdump; a CUDA toolkit on PATH works as well."""
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

class _StandInDriver:
    """Just enough of a Triton driver for `kernel.warmup` to compile: warmup asks the active
    driver for the current device, stream and target, and compiles for that target. Nothing is
    loaded or launched, so no GPU is needed."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def discover_cases(extra_modules=()) -> tuple[list, list[KernelReport]]:
    """[(module name, GpuCompileCase)] from every kernels module with gpu_compile_cases(), plus
    extra_modules; and an error report for each module that fails to import or to list cases."""
    from engine import kernels
    names = [f"engine.kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)
             if m.name != "common" and not m.name.startswith("_")]
    cases, errors = [], []
    for name in names + list(extra_modules):
        try:
            module = importlib.import_module(name)
            if hasattr(module, "gpu_compile_cases"):
                cases += [(name, case) for case in module.gpu_compile_cases()]
        except Exception:
            errors.append(KernelReport(kernel=name, config="", target="-", module=name,
                                       error=f"cannot list cases: {traceback.format_exc()}"))
    return cases, errors


def _case_config(case) -> str:
    constexprs = " ".join(f"{k}={v}" for k, v in case.constexprs.items())
    return f"warps={case.num_warps} stages={case.num_stages} {constexprs}".strip()


def _ptxas_log(compiled) -> str:
    """Re-run ptxas -v on the kernel's PTX, with the flags Triton used to build its cubin, for the
    numbers Triton reads only when it loads the cubin on a device (registers, spills). Logs are
    cached next to Triton's cache: Triton's compile is cached too, so ptxas would dominate reruns."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    meta = compiled.metadata
    ptxas = get_ptxas(meta.target.arch).path  # Triton uses a newer ptxas for sm90+
    flags = ["-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(meta.target.arch)}"]
    flags += [] if meta.enable_fp_fusion else ["--fmad=false"]
    flags += meta.ptx_options.split() if meta.ptx_options else []
    ptx = compiled.asm["ptx"]
    key = hashlib.sha256("\0".join([ptxas, *flags, ptx]).encode()).hexdigest()
    cached = Path(knobs.cache.dir) / "engine_readiness" / f"{key}.log"
    if cached.exists():
        return cached.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        done = _run([ptxas, *flags, Path(tmp) / "k.ptx", "-o", Path(tmp) / "k.cubin"])
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(done.stderr)
    return done.stderr


def _cuda_usage(compiled, report: KernelReport):
    entries = parse_ptxas_log(_ptxas_log(compiled))
    usage = entries.get(compiled.metadata.name) or next(iter(entries.values()))
    # Tensor cores from the PTX rather than the SASS: same answer (checked on toy kernels: every
    # mma.sync became HMMA, every wgmma HGMMA), without a 0.25 s disassembly per kernel.
    ptx = compiled.asm["ptx"]
    report.registers = usage["registers"]
    report.shared_bytes = compiled.metadata.shared + usage["shared_bytes"]
    report.spill_bytes = usage["spill_stores"] + usage["spill_loads"]
    report.local_bytes = usage["stack_bytes"]
    report.uses_mma = bool(PTX_MMA.search(ptx))
    report.uses_wgmma = bool(PTX_WGMMA.search(ptx))
    report.details = dict(spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
                          barriers=usage["barriers"],
                          global_scratch_bytes=compiled.metadata.global_scratch_size)


def _amd_usage(compiled, report: KernelReport):
    asm = compiled.asm["amdgcn"]
    usage = parse_amdgcn(asm)
    report.registers = usage["vgpr_count"]
    report.shared_bytes = compiled.metadata.shared + usage["lds_bytes"]
    # AMD reports spilled registers, not bytes: count 4 bytes (one dword per lane) each.
    report.spill_bytes = 4 * (usage["vgpr_spill_count"] + usage["sgpr_spill_count"])
    report.local_bytes = usage["scratch_bytes"]
    report.uses_mma = bool(AMD_MFMA.search(asm))
    report.uses_wgmma = None  # no warpgroup mma on AMD
    # triton 3.6's AMD backend allocates no global scratch and has no such field (None: not reported)
    report.details = dict(usage, global_scratch_bytes=getattr(compiled.metadata, "global_scratch_size", None))


def compile_case(module: str, case, target_name: str) -> KernelReport:
    """Compile one case for one target through kernel.warmup and read its resource usage.

    warmup works for all three targets on triton 3.6 to 3.9 (hip included: Triton's wheel carries the
    AMD linker), so triton.compile(ASTSource(...)) is not needed as a fallback."""
    import triton
    from triton.backends.compiler import GPUTarget

    report = KernelReport(kernel=case.name, config=_case_config(case), target=target_name,
                          module=module, expects_tensor_cores=case.expects_tensor_cores)
    start = time.perf_counter()
    try:
        if not isinstance(case.kernel, triton.runtime.JITFunction):
            raise TypeError(f"{case.kernel!r} is not a compilable @triton.jit kernel "
                            "(defined while TRITON_INTERPRET=1 was set?)")
        target = GPUTarget(*TARGET_SPECS[target_name])
        triton.runtime.driver.set_active(_StandInDriver(target))
        # The in-memory kernel cache is keyed by device, not target: without this the second
        # target would get the first target's binary. (Triton's disk cache does key on target.)
        case.kernel.device_caches.clear()
        compiled = case.kernel.warmup(*case.args, grid=case.grid, num_warps=case.num_warps,
                                      num_stages=case.num_stages, **case.constexprs)
        (_amd_usage if target.backend == "hip" else _cuda_usage)(compiled, report)
    except Exception as e:
        report.error = f"{type(e).__name__}: {e}"
    finally:
        # Leave no stand-in binary behind for a real launch in this process (on a GPU machine).
        case.kernel.device_caches.clear()
        report.seconds = time.perf_counter() - start
    return report


def _restore_driver():
    import triton
    try:
        triton.runtime.driver.reset_active()
    except Exception:
        pass  # no GPU driver on this machine (the usual case here): nothing to restore


def _compile_triton_share(share: int, shares: int, name_filter, extra_modules) -> list[KernelReport]:
    """Compile every shares-th (case, target) job, starting at job `share`, in this process."""
    cases, _ = discover_cases(extra_modules)
    jobs = [(module, case, target) for module, case in cases
            if not name_filter or name_filter in case.name for target in TARGET_SPECS]
    try:
        return [compile_case(*job) for job in jobs[share::shares]]
    finally:
        _restore_driver()


def compile_triton_cases(name_filter=None, extra_modules=()) -> list[KernelReport]:
    """Reports for every case x target, in case order. Compiling is CPU-bound Python and LLVM
    (about 0.1-3 s a job, over a thousand jobs), so the jobs are shared out to one process per
    core; each process discovers the cases itself (kernels do not pickle)."""
    _, reports = discover_cases(extra_modules)  # reports: modules that failed to give cases
    shares = os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=shares, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_compile_triton_share, range(shares), [shares] * shares,
                              [name_filter] * shares, [tuple(extra_modules)] * shares))
    # job j was compiled by process j % shares as its (j // shares)-th job
    jobs = sum(len(part) for part in parts)
    return reports + [parts[j % shares][j // shares] for j in range(jobs)]


# ----------------------------------------------------------------------------------------------
# CUDA C++
# ----------------------------------------------------------------------------------------------

def csrc_dir() -> Path:
    """The csrc/ tree whose cuda/*.cu are compiled (ENGINE_READINESS_CSRC points elsewhere, for
    trying this module on toy sources)."""
    return Path(os.environ.get("ENGINE_READINESS_CSRC", REPO / "csrc"))


def _demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names: 'void ns::k<half, true>(Args<half>)' -> 'ns::k<half, true>'
    (template arguments tell instantiations apart; the parameter list only repeats them)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    out = _run([tool], input="\n".join(names)).stdout.splitlines() if tool and names else []
    if len(out) != len(names):
        return {n: n for n in names}
    return {n: re.sub(r"^void ", "", re.sub(r"\(.*\)$", "", d)) for n, d in zip(names, out)}


def _compile_cu(path: Path, target_name: str, nvcc: str, csrc: Path) -> list[KernelReport]:
    config = "nvcc " + " ".join(NVCC_ARCH[target_name])
    name = path.name
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / f"{path.stem}.{target_name}.o"
        done = _run([nvcc, *NVCC_ARCH[target_name], "-std=c++17", "-O3", "-Xptxas", "-v",
                     "-I", csrc, "-I", csrc / "common", "-c", path, "-o", obj])
        if done.returncode != 0:
            return [KernelReport(kernel=name, config=config, target=target_name, source="cuda",
                                 module=name, error=f"nvcc failed:\n{done.stderr}",
                                 seconds=time.perf_counter() - start)]
        sass = split_sass(_run([_cuobjdump(), "-sass", obj]).stdout)
    entries = parse_ptxas_log(done.stderr)
    if not entries:
        return [KernelReport(kernel=name, config=config, target=target_name, source="cuda",
                             module=name, skipped="no __global__ kernels in file")]
    pretty = _demangle(list(entries))
    seconds = (time.perf_counter() - start) / len(entries)
    reports = []
    for fn, usage in entries.items():
        code = sass.get(fn, "")
        reports.append(KernelReport(
            kernel=f"{name}:{pretty[fn]}", config=config, target=target_name, source="cuda",
            module=name, registers=usage["registers"], shared_bytes=usage["shared_bytes"],
            spill_bytes=usage["spill_stores"] + usage["spill_loads"], local_bytes=usage["stack_bytes"],
            uses_mma=bool(SASS_MMA.search(code)),
            uses_wgmma=bool(SASS_WGMMA.search(code)), seconds=seconds,
            details=dict(spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
                         barriers=usage["barriers"], mangled=fn)))
    return reports


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")


def cuda_sources(csrc: Path | None = None) -> list[Path]:
    return sorted(((csrc or csrc_dir()) / "cuda").glob("*.cu"))


def compile_cuda_sources(name_filter=None, csrc: Path | None = None) -> list[KernelReport]:
    """Compile every csrc/cuda/*.cu for sm_80 and sm_90a with nvcc; one report per kernel and
    target (shared_bytes is static shared memory only: dynamic sizes are chosen at launch)."""
    csrc = csrc or csrc_dir()
    sources = cuda_sources(csrc)
    nvcc = find_nvcc()
    if not nvcc:
        return [KernelReport(kernel=p.name, config="", target=t, source="cuda", module=p.name,
                             skipped="nvcc not found") for p in sources for t in NVCC_ARCH
                if not name_filter or name_filter in p.name]
    jobs = [(p, t) for p in sources for t in NVCC_ARCH]
    # nvcc is a separate process: run as many at once as there are cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda job: _compile_cu(job[0], job[1], nvcc, csrc), jobs)
    # the filter matches "file.cu:kernel", so a file name selects all of its kernels
    reports = [r for rs in results for r in rs if not name_filter or name_filter in r.kernel]
    order = list(NVCC_ARCH)
    return sorted(reports, key=lambda r: (r.kernel, order.index(r.target)))


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def _extra_modules(extra_modules) -> list[str]:
    if extra_modules is not None:
        return list(extra_modules)
    return [m for m in os.environ.get("ENGINE_READINESS_MODULES", "").split(",") if m]


def run_all(name_filter=None, extra_modules=None) -> list[KernelReport]:
    """Reports for every Triton case x target and every CUDA kernel x arch whose name contains
    name_filter. Under TRITON_INTERPRET=1 this runs `python -m engine.readiness --json` in a
    subprocess without it, since interpreter kernels cannot be compiled."""
    extra = _extra_modules(extra_modules)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        return run_in_subprocess(name_filter, extra)
    return compile_triton_cases(name_filter, extra) + compile_cuda_sources(name_filter)


def run_in_subprocess(name_filter=None, extra_modules=(), timeout=1800) -> list[KernelReport]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ENGINE_READINESS_MODULES"] = ",".join(extra_modules)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + sys.path)  # extra modules import there too
    cmd = [sys.executable, "-m", "engine.readiness", "--json"]
    cmd += ["--kernels", name_filter] if name_filter else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    try:
        return [KernelReport(**r) for r in json.loads(done.stdout)]
    except (json.JSONDecodeError, TypeError) as e:
        raise RuntimeError(f"engine.readiness failed ({e}); stderr:\n{done.stderr}") from None


def format_table(reports: list[KernelReport]) -> str:
    """One row per kernel and target: registers, shared bytes, spill and local bytes, tensor
    cores (mma = warp mma or MFMA, wgmma = sm90 warpgroup mma) and what is wrong."""
    def cell(v):
        return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))
    head = ["kernel", "target", "regs", "shared", "spill", "local", "mma", "wgmma", "time", "status"]
    rows = []
    for r in reports:
        status = (f"skipped: {r.skipped}" if r.skipped else "; ".join(r.problems()) or "ok")
        rows.append([r.kernel, r.target, cell(r.registers), cell(r.shared_bytes), cell(r.spill_bytes),
                     cell(r.local_bytes), cell(r.uses_mma), cell(r.uses_wgmma), f"{r.seconds:.1f}s",
                     status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ready = sum(not r.problems() and not r.skipped for r in reports)
    lines.append(f"{ready}/{len(reports)} ready, {sum(bool(r.skipped) for r in reports)} skipped")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.readiness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--kernels", metavar="NAME_SUBSTRING", help="only kernels whose name contains this")
    parser.add_argument("--list", action="store_true",
                        help="print the Triton cases found as JSON, compiling nothing")
    parser.add_argument("--fail-on", choices=("problems", "errors"), default="problems",
                        help="exit non-zero on any problem (default), or only on kernels that do not compile "
                             "(the table still shows spills; scripts/oldest_triton.sh uses this under triton 3.6)")
    args = parser.parse_args(argv)
    # Compilers (and Triton on a ptxas failure) print to stdout; keep stdout for our output alone.
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        start = time.perf_counter()
        if args.list:
            cases, errors = discover_cases(_extra_modules(None))
        else:
            reports = run_all(args.kernels)
        elapsed = time.perf_counter() - start
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    if args.list:
        found = [dict(kernel=c.name, module=m, expects_tensor_cores=c.expects_tensor_cores)
                 for m, c in cases if not args.kernels or args.kernels in c.name]
        print(json.dumps(found + [dict(kernel=e.kernel, module=e.module, error=e.error) for e in errors],
                         indent=1))
        return 1 if errors else 0
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    else:
        print(format_table(reports))
        print(f"compiled in {elapsed:.1f}s")
    if not reports:
        # Nothing compiled is nothing checked: a misspelt filter must not pass as "ready".
        what = f"no kernel name contains {args.kernels!r}" if args.kernels else "no kernels found"
        print(f"engine.readiness: {what}, so nothing was checked", file=sys.stderr)
        return 1
    if args.fail_on == "errors":
        return 1 if any(r.error and not r.skipped for r in reports) else 0
    return 1 if any(r.problems() for r in reports) else 0


if __name__ == "__main__":
    # Run main() from the importable module, not __main__, so that the compile processes
    # unpickle their reports as engine.readiness.KernelReport.
    from engine.readiness import main as readiness_main
    sys.exit(readiness_main())
