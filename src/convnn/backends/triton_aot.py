"""Compile the Triton backend's kernels ahead of time for real GPUs, without a GPU.

Every entry of :func:`convnn.backends.triton.table` (the configurations the backend can
launch) is compiled with ``triton.compile`` for a ``GPUTarget('cuda', arch, 32)``, and its
cubin's resource usage is read with the ``cuobjdump`` that ships inside Triton's wheel:
registers per thread, stack frame and local memory (spills), and shared memory (Triton's
metadata). Each must fit the target (no spills at all), and every kernel with a matrix
product must run it on tensor cores (``mma``/``wgmma`` of the operand type: tf32 for
float32).

    python -m convnn.backends.triton_aot                  # sm_80 and sm_90, a table
    python -m convnn.backends.triton_aot --arch 89 --json report.json

Exits non-zero when any configuration fails. Needs triton and must run without
``TRITON_INTERPRET=1`` (the interpreter replaces the compiler). Compiled kernels land in
Triton's cache (``TRITON_CACHE_DIR``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# Per-block limits of each target: opt-in dynamic shared memory (bytes), registers per
# thread and per SM (the CUDA programming guide's compute capability table).
LIMITS = {
    80: dict(shared=166912, regs_thread=255, regs_sm=65536),
    86: dict(shared=101376, regs_thread=255, regs_sm=65536),
    89: dict(shared=101376, regs_thread=255, regs_sm=65536),
    90: dict(shared=232448, regs_thread=255, regs_sm=65536),
}
_POINTEE = {"*f32": "*fp32", "*i32": "*i32", "*i64": "*i64"}
_X = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MMA_TYPE = {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "f16"}


def signature(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``triton.compiler.ASTSource`` for one launch: the
    specialisation a launch with the backend's arguments gets (see ``triton_kernels.ARGS``)."""
    from . import triton_kernels as kernels

    fn = getattr(kernels, launch.kernel)
    args = kernels.ARGS[launch.kernel]
    consts = launch.kwargs()
    for option in launch.options():
        consts.pop(option)
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
            continue
        kind = args[arg]
        sig[arg] = "i32" if kind.startswith("i32") else _POINTEE.get(kind, "*" + _X[launch.dtype])
        if kind.startswith("*") or kind == "i32:16":  # 16-byte aligned / multiple of 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(fn.arg_names) - set(sig)
    if missing or set(args) - set(fn.arg_names):
        raise ValueError(f"ARGS[{launch.kernel!r}] does not match its parameters: {missing}")
    return sig, {arg: consts[arg] for arg in fn.arg_names if arg in consts}, attrs


def _variant(fn, sig: dict, consts: dict, attrs: dict, options: dict) -> str:
    """A comparable description of one compiled variant of ``fn``: its signature, constants
    by name (keys may be names or Triton's (index,) paths), non-empty attributes, options."""
    named = {k if isinstance(k, str) else fn.arg_names[k[0]]: v for k, v in consts.items()}
    consts = {a: named[a] for a in fn.arg_names if a in named}
    attrs = {k: v for k, v in sorted(attrs.items()) if v}
    return repr((dict(sig), consts, attrs, options))


def argument_errors(launch, args: tuple) -> list[str]:
    """Where launch arguments would specialise differently from :func:`signature`."""
    from . import triton_kernels as kernels

    errors = []
    kinds = kernels.ARGS[launch.kernel]
    names = [a for a in getattr(kernels, launch.kernel).arg_names if a in kinds]
    if len(names) != len(args):
        return [f"{launch.kernel}: {len(args)} arguments for {len(names)} parameters"]
    want = {"*x": launch.dtype, "*f32": torch.float32, "*i32": torch.int32, "*i64": torch.int64}
    for arg, value in zip(names, args):
        kind = kinds[arg]
        if kind.startswith("*"):
            ok = isinstance(value, torch.Tensor) and value.dtype == want[kind]
            ok = ok and value.data_ptr() % 16 == 0
        else:
            ok = type(value) is int and 0 <= value < 2**31
            ok = ok and (kind == "i32" or value % 16 == 0)
        if not ok:
            got = repr(value)
            if isinstance(value, torch.Tensor):
                got = f"a {value.dtype} tensor at address {value.data_ptr()}"
            errors.append(f"{launch.kernel}: argument {arg} ({kind}) got {got}")
    return errors


@contextlib.contextmanager
def _float32_matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def sample_launches() -> list[tuple]:
    """(launch, arguments) of every launch the backend makes over calls that reach every
    entry of its table: CPU tensors, launches recorded instead of run (outputs are garbage)."""
    from . import triton as tb

    launches: list[tuple] = []
    previous = tb._recorder
    tb._recorder = lambda launch, grid, args: launches.append((launch, args))
    gen = torch.Generator().manual_seed(0)
    try:
        for dtype in tb.DTYPES:

            def rand(*shape, dtype=dtype):
                return torch.randn(*shape, generator=gen).to(dtype)

            for K in (1, 16, 17, 33, 64, 65, tb.MAX_K):
                tb.select(rand(2, 5, 7), rand(1, 130, 7), K)
            tb.select(rand(1, 5, 32), rand(1, 50, 32), 3, exclude=torch.arange(5))
            for precision, kernel, (G, C) in itertools.product(
                ("highest", "high"), ("none", "depthwise", "standard"), ((1, 16), (2, 6))
            ):
                c_out = 5 if kernel == "standard" else C
                weight = {"depthwise": rand(C, 1, 3), "standard": rand(c_out, C, 3)}.get(kernel)
                inputs = [rand(2, 13, C), rand(2, G, 9, 3), weight, rand(c_out)]
                inputs = [None if t is None else t.requires_grad_() for t in inputs]
                idx = torch.randint(0, 13, (2, G, 9, 3), generator=gen)
                with _float32_matmul_precision(precision):
                    out = tb.aggregate(inputs[0], idx, *inputs[1:], kernel)
                    out.backward(rand(2, 9, c_out))
    finally:
        tb._recorder = previous
    return launches


def specialisation_errors(launches: list[tuple], arch: int) -> list[str]:
    """Where Triton's JIT, given a launch's actual arguments, would compile another variant
    than :func:`signature` (so than the AOT test compiled). Needs the real JIT, not the
    interpreter; uses its binder (``create_function_from_signature``), an internal API."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from . import triton_kernels as kernels

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict = {}
    errors = []
    for launch, args in launches:
        fn = getattr(kernels, launch.kernel)
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = launch.kwargs()
        bound, spec, options = binders[fn](*args, **kwargs)
        options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        options = {k: getattr(options, k) for k in launch.options()}
        got = _variant(fn, sig, consts, attrs, options)
        want = _variant(fn, *signature(launch), launch.options())
        if got != want:
            errors.append(f"{launch.describe()}: the JIT would compile {got}, not {want}")
    return list(dict.fromkeys(errors))


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"cuobjdump is not in the triton wheel ({path})")
    return str(path)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if set(found) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output: {out!r}")
    return {k.lower(): int(v) for k, v in found.items()}


def compile_one(launch, arch: int, limits: dict | None = None) -> dict:
    """Compile one launch for sm_<arch>; a record of its resources and the checks' verdicts
    against ``limits`` (default ``LIMITS[arch]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as kernels

    consts = " ".join(
        f"{k.removeprefix('BLOCK_')}={v}"
        for k, v in launch.constants
        if k != "DOT" and v is not None
    )
    opts = f"{launch.num_warps} warps, {launch.num_stages} stage, maxnreg {launch.maxnreg}"
    record = dict(
        launch=launch.describe(),
        arch=arch,
        kernel=launch.kernel,
        dtype=str(launch.dtype).removeprefix("torch."),
        config=f"{consts}; {opts}",
    )
    try:
        sig, consts, attrs = signature(launch)
        src = ASTSource(getattr(kernels, launch.kernel), sig, consts, attrs)
        target = GPUTarget("cuda", arch, 32)
        compiled = triton.compile(src, target=target, options=launch.options())
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as err:  # a failed compile is a result: reported, never raised
        record["errors"] = [f"compile failed: {type(err).__name__}: {err}"]
        return record
    ptx = compiled.asm["ptx"]
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)\.\S*", ptx)))
    threads = launch.num_warps * 32
    record.update(usage, shared=compiled.metadata.shared, threads=threads, mma=mma)
    limits = limits or LIMITS[arch]
    errors = []
    if usage["stack"] or usage["local"]:
        errors.append(f"spills: stack {usage['stack']} B, local {usage['local']} B per thread")
    if usage["reg"] > limits["regs_thread"] or usage["reg"] * threads > limits["regs_sm"]:
        errors.append(f"{usage['reg']} registers x {threads} threads do not fit")
    if record["shared"] > limits["shared"]:
        errors.append(f"{record['shared']} B of shared memory > {limits['shared']} B")
    if launch.has_matmul:
        kind = _MMA_TYPE[launch.dtype]
        instructions = re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.\S*", ptx)
        if not instructions:
            errors.append("its matrix products do not use tensor cores (no mma/wgmma)")
        elif not all(f".{kind}" in i for i in instructions):
            errors.append(f"tensor-core products are not all {kind}: {mma}")
    record["errors"] = errors
    return record


def run(archs: list[int], jobs: int | None = None, limits: dict | None = None) -> list[dict]:
    """Compile the whole table for each arch (in ``jobs`` processes); one record each.
    ``limits`` ({arch: {shared, regs_thread, regs_sm}}) adds to or replaces ``LIMITS``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    from .triton import table

    limits = {**LIMITS, **(limits or {})}
    unknown = [a for a in archs if a not in limits]
    if unknown:
        raise ValueError(f"no resource limits known for sm_{unknown[0]}: pass them (--shared ...)")
    work = [(launch, arch, limits[arch]) for arch in archs for launch in table()]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    if jobs <= 1:
        return [compile_one(*w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def markdown(records: list[dict]) -> str:
    """A table of the records: one row per configuration, one column per arch with registers
    per thread, spilled bytes per thread (stack + local), shared memory and the tensor-core
    instruction used."""
    archs = sorted({r["arch"] for r in records})
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(r["launch"], {})[r["arch"]] = r
    head = ["kernel", "dtype", "configuration"]
    head += [f"sm_{a}: regs / spill B / shared B / MMA" for a in archs] + ["ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for by_arch in rows.values():
        first = next(iter(by_arch.values()))
        cells = [first["kernel"], first["dtype"], first["config"]]
        for a in archs:
            r = by_arch.get(a)
            if r is None or "reg" not in r:
                cells.append("-")
                continue
            mma = ", ".join(sorted({m.split(".")[0] for m in r["mma"]})) or "none"
            spill = r["stack"] + r["local"]
            cells.append(f"{r['reg']} / {spill} / {r['shared']} / {mma}")
        errors = [f"sm_{r['arch']}: {e}" for r in by_arch.values() for e in r["errors"]]
        cells.append("yes" if not errors else "; ".join(errors))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def jit_compiled() -> list[dict]:
    """What Triton's JIT compiled for the backend's kernels in this process (on a GPU): per
    compiled variant, the table entry it matches (None: none does), the loaded binary's
    registers and spills (bytes of local memory per thread) and a description."""
    from . import triton_kernels as kernels
    from .triton import table

    expected = {}
    for launch in table():
        fn = getattr(kernels, launch.kernel)
        expected[_variant(fn, *signature(launch), launch.options())] = launch
    out = []
    for name in kernels.ARGS:
        fn = getattr(kernels, name)
        for cache in fn.device_caches.values():
            for compiled in cache[0].values():
                meta = compiled.metadata
                options = {k: getattr(meta, k) for k in ("num_warps", "num_stages", "maxnreg")}
                src = compiled.src
                variant = _variant(fn, src.signature, src.constants, src.attrs, options)
                out.append(
                    dict(
                        launch=expected.get(variant),
                        describe=f"{name} {variant}",
                        n_regs=getattr(compiled, "n_regs", None),
                        n_spills=getattr(compiled, "n_spills", None),
                    )
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", help="compute capabilities, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument(
        "--shared", type=int, help="shared memory per block (bytes) of the one --arch given"
    )
    parser.add_argument("--regs-per-sm", type=int, help="registers per SM of the one --arch")
    args = parser.parse_args(argv)
    from .triton import ARCHS

    archs = args.arch or list(ARCHS)
    limits = None
    if args.shared or args.regs_per_sm:
        if len(archs) != 1:
            parser.error("--shared / --regs-per-sm describe one --arch")
        known = LIMITS.get(archs[0], dict(regs_thread=255, regs_sm=65536, shared=None))
        given = dict(shared=args.shared, regs_sm=args.regs_per_sm)
        limits = {archs[0]: {**known, **{k: v for k, v in given.items() if v}}}
        if limits[archs[0]]["shared"] is None:
            parser.error(f"--shared is needed for sm_{archs[0]}")
    records = run(archs, args.jobs, limits)
    launches = sample_launches()
    mismatches = [e for arch in archs for e in specialisation_errors(launches, arch)]
    if args.json:
        args.json.write_text(
            json.dumps(dict(records=records, specialisation_errors=mismatches), indent=1)
        )
    print(markdown(records))
    failed = [r for r in records if r["errors"]]
    print(f"\n{len(records) - len(failed)} of {len(records)} compilations pass", file=sys.stderr)
    for error in mismatches:
        print(f"specialisation mismatch: {error}", file=sys.stderr)
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
