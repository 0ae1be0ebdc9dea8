"""Checkpoints: atomic writes (temp file + fsync + rename) and loads that never unpickle arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with `torch.save`
and read with `torch.load(weights_only=True)`; anything else in the file makes loading fail cleanly.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from mutualkd.errors import UserError, first_line

FORMAT = "mutualkd-checkpoint"
VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call `write(file_object)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy(src: Path, dst: Path) -> None:
    """Atomically copy a written checkpoint (last -> best) without serialising it again."""
    with src.open("rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, length=1 << 24))


def save(payload: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load(path: Path) -> dict:
    """Load a mutualkd checkpoint; a missing, corrupt, unsafe or foreign file is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                        f"({first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{path}: corrupt or not a checkpoint ({first_line(err)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a mutualkd checkpoint (no '{FORMAT}' header)")
    if data.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {data.get('version')} is not supported (expected {VERSION})")
    return data


def rng_state() -> dict:
    """Every global RNG a step may draw from, as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
