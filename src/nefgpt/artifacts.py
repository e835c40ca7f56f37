"""Reading and writing run-directory artifacts.

Every write goes to a temporary file in the same directory and is renamed into
place, so a crash or a full disk never leaves a half-written artifact behind.
Every read names the file in its error: nothing here unpickles user data.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ArtifactError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        # mkstemp makes the file private (0600); an artifact gets the mode a plain open() would give it.
        os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError as exc:
        raise ArtifactError(f"{path}: can't write it ({_os_reason(exc)})") from None
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # Again: a writer may have replaced the file (safetensors' save_file makes a new one, mode 0600).
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            os.replace(tmp_path, path)
        except OSError as exc:  # e.g. a full disk: the old file, if any, is untouched
            raise ArtifactError(f"{path}: can't write it ({_os_reason(exc)}); any previous version is kept") from None
    finally:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_json(path: str | Path) -> Any:
    path = Path(path)
    _require(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors; metadata values are stored JSON-encoded."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | Path, expect: dict[str, torch.dtype] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON-decoded metadata.

    `expect` maps required tensor names to dtypes; a missing name, a wrong dtype
    or a non-finite floating value is reported as an ArtifactError naming the file.
    """
    path = Path(path)
    meta = load_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    for name, dtype in (expect or {}).items():
        if name not in tensors:
            raise ArtifactError(f"{path}: missing tensor '{name}'")
        if tensors[name].dtype != dtype:
            raise ArtifactError(f"{path}: tensor '{name}' has dtype {tensors[name].dtype}, expected {dtype}")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor '{name}' contains NaN or Inf")
    return tensors, meta


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors file, without reading its tensors."""
    path = Path(path)
    _require(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        return {k: json.loads(v, parse_constant=_no_constant) for k, v in raw_meta.items()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True: never unpickles arbitrary objects."""
    path = Path(path)
    _require(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol warning about a file it then refuses
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own first line advises retrying with weights_only=False: never repeat that for an untrusted file.
        raise ArtifactError(f"{path}: corrupt, or not a weights-only checkpoint; refused ({_unpickler_reason(exc)})") from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise ArtifactError(f"{path}: not a loadable weights-only checkpoint ({_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ArtifactError(f"{path}: checkpoint lacks the 'model' and 'model_args' entries")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_args"], dict):
        raise ArtifactError(f"{path}: checkpoint's 'model' and 'model_args' must be dicts")
    ema = ckpt.get("ema")
    averaged = ema.get("shadow") if isinstance(ema, dict) else None
    if ema is not None and not isinstance(averaged, dict):
        raise ArtifactError(f"{path}: checkpoint's 'ema' entry must hold a 'shadow' dict of weights")
    for kind, weights in (("model", ckpt["model"]), ("averaged", averaged or {})):
        for name, t in weights.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise ArtifactError(f"{path}: {kind} weight '{name}' contains NaN or Inf")
    return ckpt


def _require(path: Path) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that makes it first)")


def _unpickler_reason(exc: BaseException) -> str:
    """The specific complaint of torch's weights-only unpickler, e.g. "... unsupported GLOBAL posix.system ..."."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or next((x for x in lines[i + 1 :] if x), "")
            if rest:
                return rest.split(". ")[0][:160]
    return next((x.split(". ")[0][:160] for x in lines if "unsupported" in x.lower()), "unreadable pickle data")


def _no_constant(name: str) -> Any:
    """Metadata never holds NaN or Infinity (json.dumps only writes them for non-finite floats): refuse them."""
    raise ValueError(f"metadata holds {name}")


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
