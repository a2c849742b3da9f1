"""Checkpoints that lose nothing and never execute code.

A checkpoint is one safetensors file. Tensors: the model's state dict (``model.*``), the
optimizer's per-parameter state (``optim.<index>.<name>``) and RNG states (``rng.*``).
Everything else -- model identity, epoch, step, scheduler state, optimizer hyper-parameters,
the metrics history, the resolved config -- is JSON in the safetensors metadata field under
``convnn``. A SHA-256 of all tensor bytes is stored alongside, so truncation and bit rot are
detected on load.

Files are written atomically: a temporary file in the same folder, flush + fsync, ``os.replace``,
then fsync of the folder. A reader sees either the old file or the new one, never a mix, even
after ``kill -9`` or a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "arch_signature",
    "atomic_write_bytes",
    "load_checkpoint",
    "load_weights",
    "read_metadata",
    "save_checkpoint",
]

FORMAT = "convnn-checkpoint/1"
_META_KEY = "convnn"


class CheckpointError(ValueError):
    """An unusable checkpoint (missing, truncated, corrupt, or for another model)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see a complete file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def arch_signature(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of parameter names, shapes and dtypes: equal iff the architectures match."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _model_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": _cpu(v) for k, v in state_dict.items()}


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = _cpu(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    identity: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Atomically write a checkpoint.

    ``identity`` names the model (name, layer, num_classes, ...) and is checked on load;
    ``state`` is any JSON-able training state (epoch, step, metrics history, config).
    """
    from safetensors.torch import save

    model_sd = model.state_dict()
    tensors = _model_tensors(model_sd)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "identity": {**identity, "arch": arch_signature(model_sd)},
        "state": state or {},
    }
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_split(optimizer)
        tensors.update(opt_tensors)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    for key, value in (rng or {}).items():
        tensors[f"rng.{key}"] = _cpu(value)
    meta["sha256"] = _digest(tensors)
    blob = save(tensors, metadata={_META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, blob)


def _read(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{os.fspath(path)!r} is a folder, not a checkpoint file") from None


def _corrupt(path: str | os.PathLike, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {os.fspath(path)!r} is corrupt or truncated ({why}); "
        "delete it and resume from another checkpoint or start the run again"
    )


def _parse_metadata(path: str | os.PathLike, blob: bytes) -> dict:
    if len(blob) < 8:
        raise _corrupt(path, f"{len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise _corrupt(path, "header runs past the end of the file")
    try:
        header = json.loads(blob[8 : 8 + n])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError):
        raise _corrupt(path, "no convnn metadata; not a convnn checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has format {meta.get('format')!r}, "
            f"this version reads {FORMAT!r}; use a matching convnn version"
        )
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint (identity, state, ...) without loading tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "empty file")
        (n,) = struct.unpack("<Q", head)
        return _parse_metadata(path, head + f.read(min(n, 1 << 30)))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; returns (tensors, metadata). Never executes code."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = _read(path)
    meta = _parse_metadata(path, blob)
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if _digest(tensors) != meta.get("sha256"):
        raise _corrupt(path, "checksum mismatch")
    return tensors, meta


def _describe(identity: dict) -> str:
    keys = ("name", "layer", "num_classes", "in_chans", "img_size")
    return ", ".join(f"{k}={identity[k]}" for k in keys if k in identity)


def check_identity(path: str | os.PathLike, meta: dict, identity: dict, model_sd: dict) -> None:
    """Raise a :class:`CheckpointError` unless the checkpoint was written for this model."""
    saved = meta["identity"]
    expected = {**identity, "arch": arch_signature(model_sd)}
    differ = [k for k in expected if k in saved and saved[k] != expected[k]]
    if differ:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is for a different model ({_describe(saved)}) "
            f"than this run ({_describe(expected)}); use the checkpoint's own config "
            "or start a new run without --resume"
        )


def load_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    identity: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> dict:
    """Load verified model weights from ``path`` into ``model``; returns the metadata."""
    if tensors is None or meta is None:
        tensors, meta = load_checkpoint(path)
    model_sd = model.state_dict()
    check_identity(path, meta, identity, model_sd)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(model_sd) - set(weights))
    unexpected = sorted(set(weights) - set(model_sd))
    bad_shape = [k for k in weights if k in model_sd and weights[k].shape != model_sd[k].shape]
    if missing or unexpected or bad_shape:
        detail = (missing and f"missing {missing[:3]}") or (
            (unexpected and f"unexpected {unexpected[:3]}") or f"shape of {bad_shape[:3]}"
        )
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match the model ({detail}); "
            "use the config the checkpoint was trained with"
        )
    model.load_state_dict(weights)
    return meta


def restore_training_state(
    tensors: dict[str, torch.Tensor],
    meta: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, torch.Tensor]:
    """Load optimizer and scheduler state; returns the RNG tensors (``rng.*`` without prefix)."""
    if "optimizer" not in meta:
        raise CheckpointError("checkpoint has no optimizer state (weights only); cannot resume")
    try:
        optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"optimizer state in checkpoint does not fit this run ({e}); "
            "resume with the optimizer settings the run was started with"
        ) from None
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    return {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
