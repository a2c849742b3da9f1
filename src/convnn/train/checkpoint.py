"""Checkpoints that lose nothing, never execute code, and refuse any corrupted byte.

A checkpoint is one safetensors file. Tensors: the model's state dict (``model.*``), the
optimizer's per-parameter state (``optim.<index>.<name>``) and RNG states (``rng.*``).
Everything else -- model identity, epoch, step, scheduler state, optimizer hyper-parameters,
the metrics history, the resolved config -- is JSON in the safetensors metadata field under
``convnn``.

The SHA-256 stored in the metadata field ``convnn_sha256`` covers the *whole file*: it is the
hash of every byte of the file with the 64 hex digits of the digest itself replaced by zeros.
So a flipped bit anywhere -- length prefix, header, metadata JSON, tensor bytes, the digest --
is refused on load with one line (:class:`CheckpointError`) before anything is used; after the
hash, the metadata is checked against its declared layout (:data:`Metadata`), so a
well-formed file with a key missing or of the wrong type is refused the same way.

Format ``convnn-checkpoint/1`` (a hash of the tensor bytes only) is not read: its metadata is
unprotected. :func:`upgrade_checkpoint` rewrites such a file as the current format after
checking its tensors, for a user who vouches for its metadata.

Files are written atomically: a temporary file in the same folder, flush + fsync, ``os.replace``,
then fsync of the folder. A reader sees either the old file or the new one, never a mix, even
after ``kill -9`` or a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from typing import Any, TypedDict

import torch

from .typecheck import TypeMismatch, conform

__all__ = [
    "CheckpointError",
    "arch_signature",
    "atomic_write_bytes",
    "check_metadata",
    "load_checkpoint",
    "load_weights",
    "read_metadata",
    "save_checkpoint",
    "upgrade_checkpoint",
    "write_checkpoint",
]

FORMAT = "convnn-checkpoint/2"
_OLD_FORMAT = "convnn-checkpoint/1"  # tensor bytes hashed, metadata not
_META_KEY = "convnn"
_DIGEST_KEY = "convnn_sha256"
_PLACEHOLDER = b"0" * 64
# The digest's place in the header; digits are lower-case, so a flipped case bit is refused too.
_DIGEST_RE = re.compile(rb'"' + _DIGEST_KEY.encode() + rb'"\s*:\s*"([0-9a-f]{64})"')


class Identity(TypedDict):
    arch: str


class _ParamGroup(TypedDict):
    params: list[int]


class OptimizerMeta(TypedDict):
    param_groups: list[_ParamGroup]  # the other keys are compared with this run's optimizer
    scalars: dict[str, dict[str, int | float | bool | None]]


class SchedulerMeta(TypedDict):
    last_epoch: int
    _step_count: int
    base_lrs: list[float]


class _MetadataRequired(TypedDict):
    format: str
    identity: Identity
    state: dict[str, Any]


class Metadata(_MetadataRequired, total=False):
    """The layout of the ``convnn`` metadata (keys not named here pass unchecked)."""

    optimizer: OptimizerMeta
    scheduler: SchedulerMeta


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


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's hash: tensor names and bytes only (read by :func:`upgrade_checkpoint`)."""
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
    write_checkpoint(path, tensors, meta)


def _digest_span(blob: bytes | bytearray) -> int | None:
    """Where the 64 digest digits start: the one ``convnn_sha256`` entry of the header."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    found = list(_DIGEST_RE.finditer(blob, 8, min(8 + n, len(blob))))
    return found[0].start(1) if len(found) == 1 else None


def _file_digest(blob: bytes | bytearray, start: int) -> str:
    h = hashlib.sha256()
    h.update(memoryview(blob)[:start])
    h.update(_PLACEHOLDER)
    h.update(memoryview(blob)[start + 64 :])
    return h.hexdigest()


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` and the JSON-able ``meta`` with a whole-file digest."""
    from safetensors.torch import save

    blob = bytearray(
        save(tensors, metadata={_META_KEY: json.dumps(meta), _DIGEST_KEY: _PLACEHOLDER.decode()})
    )
    start = _digest_span(blob)
    if start is None:  # cannot happen with safetensors' JSON header
        raise RuntimeError("checkpoint digest field not found in the header just written")
    blob[start : start + 64] = _file_digest(blob, start).encode()
    atomic_write_bytes(path, bytes(blob))


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


def _header(path: str | os.PathLike, blob: bytes) -> dict:
    """The safetensors header as JSON (structure only; nothing in it is trusted yet)."""
    if len(blob) < 8:
        raise _corrupt(path, f"{len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise _corrupt(path, "header runs past the end of the file")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:  # also bad UTF-8
        raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _corrupt(path, "no metadata in the header; not a convnn checkpoint")
    return header


def check_metadata(path: str | os.PathLike, value: Any, layout: Any, where: str) -> Any:
    """``value`` (read from checkpoint ``path`` at ``where``) checked against ``layout`` (a type,
    e.g. a TypedDict); a missing key or a wrong type is a one-line CheckpointError."""
    try:
        return conform(value, layout, where)
    except TypeMismatch as e:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has invalid metadata: {e}; it was not written by "
            "this version of convnn, use another checkpoint"
        ) from None


def _verified_metadata(path: str | os.PathLike, blob: bytes) -> dict:
    """The metadata of ``blob``, after checking the whole-file digest and the layout."""
    meta_json = _header(path, blob)["__metadata__"].get(_META_KEY)
    if not isinstance(meta_json, str):
        raise _corrupt(path, "no convnn metadata; not a convnn checkpoint")
    start = _digest_span(blob)
    if start is None:
        try:
            old = json.loads(meta_json).get("format") == _OLD_FORMAT
        except (ValueError, AttributeError):
            old = False
        if old:
            raise CheckpointError(
                f"checkpoint {os.fspath(path)!r} has format {_OLD_FORMAT!r}, whose hash does not "
                f"cover its metadata; this version reads {FORMAT!r}. If you trust the file, "
                "convert it with convnn.train.checkpoint.upgrade_checkpoint(path)"
            )
        raise _corrupt(path, "no single digest field in the header")
    if _file_digest(blob, start) != blob[start : start + 64].decode():
        raise _corrupt(path, "checksum mismatch")
    try:
        meta = json.loads(meta_json)
    except ValueError:  # hashed, so written this way: not by convnn
        raise _corrupt(path, "metadata is not valid JSON") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has format {fmt!r}, "
            f"this version reads {FORMAT!r}; use a matching convnn version"
        )
    return check_metadata(path, meta, Metadata, "metadata")


def read_metadata(path: str | os.PathLike) -> dict:
    """The verified JSON metadata of a checkpoint (identity, state, ...), tensors not decoded."""
    return _verified_metadata(path, _read(path))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; returns (tensors, metadata). Never executes code."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = _read(path)
    meta = _verified_metadata(path, blob)
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:  # hashed, so written this way
        raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return tensors, meta


def upgrade_checkpoint(path: str | os.PathLike) -> None:
    """Rewrite a format-1 checkpoint as the current format, in place.

    Format 1 hashed the tensors only: their hash is checked here, but nothing can check the
    metadata (epoch, history, config), so upgrade only a file you trust.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = _read(path)
    try:
        meta = json.loads(_header(path, blob)["__metadata__"][_META_KEY])
        tensors = load(blob)
    except (KeyError, TypeError, ValueError, SafetensorError):
        raise _corrupt(path, "not a readable convnn checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != _OLD_FORMAT:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}; only {_OLD_FORMAT!r} "
            "files are upgraded"
        )
    if meta.pop("sha256", None) != _tensor_digest(tensors):
        raise _corrupt(path, "checksum mismatch")
    meta["format"] = FORMAT
    check_metadata(path, meta, Metadata, "metadata")
    write_checkpoint(path, tensors, meta)


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


def _difference(expected: Any, got: Any, where: str) -> str | None:
    """Where ``got`` (loaded state) lacks a key of ``expected`` (this run's fresh state) or
    holds a value of another kind; None when it has the same layout."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where} is {got!r}, expected a mapping"
        for key, value in expected.items():
            if key not in got:
                return f"{where}.{key} is missing"
            found = _difference(value, got[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"{where} is {got!r}, expected {len(expected)} items like {list(expected)!r}"
        found = (_difference(e, g, f"{where}[{i}]") for i, (e, g) in enumerate(zip(expected, got)))
        return next((f for f in found if f), None)
    if expected is None or isinstance(expected, bool):  # flags: None means the default
        same = got is None or isinstance(got, bool)
    elif isinstance(expected, (int, float)):
        same = isinstance(got, (int, float)) and not isinstance(got, bool)
    else:
        same = type(got) is type(expected) or callable(expected)
    return None if same else f"{where} is {got!r}, expected a value like {expected!r}"


def restore_training_state(
    tensors: dict[str, torch.Tensor],
    meta: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, torch.Tensor]:
    """Load optimizer and scheduler state; returns the RNG tensors (``rng.*`` without prefix).

    The loaded state must have the layout of this run's own (every key, values of the same
    kind), so a checkpoint that does not fit is refused here, not by a crash mid-training.
    """
    if "optimizer" not in meta:
        raise CheckpointError("checkpoint has no optimizer state (weights only); cannot resume")
    fresh = {k: v for k, v in optimizer.state_dict().items() if k == "param_groups"}
    try:
        optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
        problem = _difference(fresh, optimizer.state_dict(), "optimizer")
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise CheckpointError(
            f"optimizer state in checkpoint does not fit this run ({problem}); "
            "resume with the optimizer settings the run was started with"
        )
    if scheduler is not None:
        if "scheduler" not in meta:
            raise CheckpointError("checkpoint has no scheduler state; cannot resume")
        expected = scheduler.state_dict()
        # Only this scheduler's own keys: others would become attributes (even shadow methods).
        own = {k: v for k, v in meta["scheduler"].items() if k in expected}
        try:
            scheduler.load_state_dict(own)
            problem = _difference(expected, scheduler.state_dict(), "scheduler")
        except (ValueError, KeyError, TypeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise CheckpointError(
                f"scheduler state in checkpoint does not fit this run ({problem})"
            )
    return {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
