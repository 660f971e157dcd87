"""Checkpoint files: atomic writes, integrity-checked loads, RNG state capture and restore.

A checkpoint is a torch.save'd dict of tensors and plain Python values only (so it loads with
weights_only=True): model, ema, opt, scaler, loss_weighting, step, rng (one entry per rank), config,
and "integrity": the sha256 of every tensor's bytes and every value, in key order. torch.load
notices a truncated file (no zip central directory) but not flipped bytes inside a tensor record,
hence the digest. Writes go to a temp file in the target directory, are fsync'd, then os.replace'd
over the target: a crash or a full disk leaves the previous file untouched, and the temp file a
kill -9 leaves behind is removed by `remove_stale_temp_files` when the next run starts.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

LATEST = "latest.pt"
REQUIRED_KEYS = ("model", "ema", "step", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a switch-dit checkpoint."""


def _digest(obj: Any) -> str:
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"D%d" % len(o))
            for key in sorted(o, key=repr):
                h.update(repr(key).encode())
                feed(o[key])
        elif isinstance(o, (list, tuple)):
            h.update(b"L%d" % len(o))
            for v in o:
                feed(v)
        else:
            h.update(repr(o).encode())
    feed(obj)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save(obj) to `path` so that `path` is either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Add the integrity digest to `state` and write it atomically to `path`."""
    state = dict(state)
    state.pop("integrity", None)
    state["integrity"] = {"sha256": _digest(state), "format": 1}
    atomic_torch_save(state, path)


def load_checkpoint(path: str, map_location: Any = "cpu", verify: bool = True,
                    mmap: bool = False) -> Dict[str, Any]:
    """Load and check a checkpoint; CheckpointError naming the file when it is not usable.

    verify=False skips the digest (reading only what is used); mmap=True maps the tensors lazily
    (cheap peeks at "config"/"step" of multi-GB checkpoints).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): truncated or never finished")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # zip / pickle / unpickler errors all mean the same to the user
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated and cannot be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path!r} is not a switch-dit training checkpoint "
                              f"(expected keys {REQUIRED_KEYS})")
    if verify:
        stored = state.get("integrity", {}).get("sha256") if isinstance(state.get("integrity"), dict) else None
        if stored is None:
            raise CheckpointError(f"checkpoint {path!r} has no integrity digest")
        body = {k: v for k, v in state.items() if k != "integrity"}
        if _digest(body) != stored:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: its contents do not match the "
                                  "sha256 digest written with it")
    return state


# The temp files of atomic_torch_save (".ckpt_0000500.pt.<random>.tmp") and of the latest.pt
# link (".latest.pt.<pid>.link"): only ever partial copies, never the sole copy of anything.
_TEMP_FILE = re.compile(r"^\.(ckpt_\d+\.pt|latest\.pt)\..+\.(tmp|link)$")


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete checkpoint temp files a killed writer left in `directory`; returns their paths.

    Call it only when no other process writes checkpoints there (the start of a run, on rank 0).
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _TEMP_FILE.match(name) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def list_step_checkpoints(directory: str) -> List[str]:
    """Step checkpoints (ckpt_XXXXXXX.pt) in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(f for f in os.listdir(directory) if f.startswith("ckpt_") and f.endswith(".pt"))
    return [os.path.join(directory, f) for f in names]


def write_training_checkpoint(state: Dict[str, Any], directory: str, step: int,
                              keep: int = 0) -> str:
    """Write ckpt_{step:07d}.pt, then point latest.pt at the same bytes; prune old step files.

    latest.pt is replaced only after the step file is complete, by a hard link (or a copy where
    links are unsupported) renamed over it, so there is always one good latest.pt.
    """
    step_path = os.path.join(directory, f"ckpt_{step:07d}.pt")
    save_checkpoint(state, step_path)
    latest = os.path.join(directory, LATEST)
    tmp = os.path.join(directory, f".{LATEST}.{os.getpid()}.link")
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(step_path, tmp)
        except OSError:
            shutil.copyfile(step_path, tmp)
        os.replace(tmp, latest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)
    if keep > 0:
        for old in list_step_checkpoints(directory)[:-keep]:
            os.unlink(old)
    return step_path


def checkpoint_file(path: str) -> str:
    """A checkpoint file, or a results folder (-> its latest.pt)."""
    return os.path.join(path, LATEST) if os.path.isdir(path) else path


def resolve_resume_path(resume: Optional[str], results_dir: str) -> Optional[str]:
    """--resume: None/"" -> None; "auto" -> results_dir/latest.pt if present; else the path given."""
    if not resume:
        return None
    if resume == "auto":
        p = os.path.join(results_dir, LATEST)
        return p if os.path.exists(p) else None
    return checkpoint_file(resume)


# ----- RNG state -----------------------------------------------------------------------------

def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors / plain values."""
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_plain_to_py_state(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        states = [s.cpu() for s in st["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another GPU count: restore what matches by index
            for i, s in enumerate(states[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def _py_state_to_plain(state):
    version, internal, gauss = state
    return [int(version), torch.tensor(internal, dtype=torch.int64), gauss]


def _plain_to_py_state(plain):
    version, internal, gauss = plain
    return (version, tuple(int(v) for v in internal.tolist()), gauss)
