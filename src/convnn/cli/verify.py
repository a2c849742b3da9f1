"""``convnn verify``: each special case against the PyTorch module it recovers."""

from __future__ import annotations

import argparse

BACKENDS = ("reference", "chunked", "triton")  # the k-NN path, no exact shortcuts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="chunked",
        choices=BACKENDS,
        help="backend that runs the k-NN path: %(choices)s (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="precision of the check: %(choices)s (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")


def run(args: argparse.Namespace) -> int:
    import torch

    from convnn import verify

    results = verify.run_cases(args.backend, getattr(torch, args.dtype), args.seed)
    width = max(len(r.name) for r in results)
    print(f"backend={args.backend} dtype={args.dtype} seed={args.seed}\n")
    for r in results:
        status = "ok" if r.ok else "FAIL"
        print(f"{r.name:<{width}}  max|diff| = {r.max_diff:.2e}  {status}")
        print(f"{'':<{width}}  ConvNN:    {r.config}")
        print(f"{'':<{width}}  recovers:  {r.reference}")
    return 0 if all(r.ok for r in results) else 1
