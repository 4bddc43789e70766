"""Keeping runs apart: one live run per run directory, names that stay inside it, interrupted
runs resumed only from a checkpoint of the very same recipe.

A fit works in ``<output_dir>.partial``; ``<output_dir>.partial/lock`` holds the PID and host
of the run working there, so a second run on the same directory refuses at once instead of
resuming from the first one's live checkpoint. A lock left by a killed run is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

LOCK = "lock"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
PROGRESS = "progress.safetensors"  # the checkpoint of a learner with its own loop: progressive blocks, CMA-ES generations


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path``, refused unless it lies inside ``root`` (after resolving ``..`` and links)."""
    root, path = Path(root), Path(path)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write {path}: it lies outside {root}")
    return path


# ---------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """Who holds ``lock``: ``{"pid", "host"}``, or None when it is stale (a dead PID on this host,
    or an unreadable lock, e.g. one a crash cut short)."""
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return {"pid": pid, "host": host}


def _is_secondary_process() -> bool:
    """A DDP worker relaunched by Lightning (its rank-0 process already holds the lock)."""
    return any(os.environ.get(key, "0") != "0" for key in ("LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def run_lock(work_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<work_dir>/lock`` while the body runs; refuse at once if a live run holds it."""
    if _is_secondary_process():
        yield
        return
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = work_dir / LOCK
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):  # a stale lock is removed once, then taken like a free one
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise FileExistsError(
                    f"{work_dir} is in use by a live run (PID {holder['pid']} on {holder['host']}); "
                    f"wait for it, stop it, or choose another output_dir"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        break
    else:
        raise FileExistsError(f"{work_dir}: another run took the lock at the same moment; try again")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == mine:
                lock.unlink()


# ---------------------------------------------------------------------- interrupted runs


def differing_keys(before: object, now: object, prefix: str = "") -> list[str]:
    """The dotted keys (``optimizer.lr``, ``objectives.0.name``) where two plain configs differ."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = list(dict.fromkeys([*before, *now]))
        return [d for k in keys for d in differing_keys(before.get(k), now.get(k), f"{prefix}{k}.")]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [d for i, (b, n) in enumerate(zip(before, now)) for d in differing_keys(b, n, f"{prefix}{i}.")]
    return [] if before == now else [prefix.rstrip(".")]


def resume_point(recipe: DictConfig, work_dir: Path) -> Path | None:
    """The checkpoint to resume from when an earlier attempt of this very recipe was interrupted.

    A partial run with no checkpoint has nothing to resume: it is cleared and started afresh
    (whatever recipe it held). One with a checkpoint of a different recipe is refused, naming
    the keys that differ. Call it holding :func:`run_lock`.
    """
    from adamerge.app.config import save_recipe

    saved, last = work_dir / "recipe.yaml", work_dir / CHECKPOINT
    if (last.exists() or (work_dir / PROGRESS).exists()) and saved.exists():
        before = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(saved)).items() if k != "overwrite"}
        now = {k: v for k, v in OmegaConf.to_container(recipe, resolve=True).items() if k != "overwrite"}
        changed = differing_keys(before, now)
        if changed:
            raise ValueError(
                f"{work_dir} holds an interrupted run of a different recipe (differing: {', '.join(changed)}); "
                "rerun that recipe to resume it, or delete the folder to start over"
            )
    elif work_dir.exists() and not _is_secondary_process():  # DDP workers start after rank 0 has begun
        for entry in work_dir.iterdir():
            if entry.name != LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, saved)
    if not last.exists():
        return None
    checkpoint = _readable_checkpoint(last)
    if not _is_secondary_process():
        _set_log_aside(work_dir)
    return checkpoint


# ---------------------------------------------------------------------- provenance

INPUTS = "inputs.json"


def _fingerprints(path: Path) -> dict[str, dict]:
    """``file -> {sha256, size}`` for a file, or for every file under a folder (a model directory)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    prints = {}
    for file in files:
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        prints[str(file)] = {"sha256": digest.hexdigest(), "size": file.stat().st_size}
    return prints


def write_inputs(folder: Path, read: dict[str, str], description: dict) -> None:
    """``inputs.json``: the sha256 and size of every input file the run read (``read``, from
    :func:`~adamerge.io.checkpoints.record_inputs`, plus the base model its problem names)."""
    from adamerge.io.checkpoints import write_text

    base = description.get("base")
    sources = dict(read)
    if isinstance(base, str) and Path(base).exists():
        sources.setdefault(str(Path(base).resolve()), "pretrained")
    entries = {
        file: {"role": role, **fingerprint}
        for source, role in sources.items()
        for file, fingerprint in _fingerprints(Path(source)).items()
    }
    write_text(inside(folder, folder / INPUTS), json.dumps(entries, indent=1))


def changed_inputs(run_dir: Path) -> list[str]:
    """One line per input file of a finished run that is gone or differs from when it ran."""
    if not (run_dir / INPUTS).exists():
        return []
    changed = []
    for file, was in json.loads((run_dir / INPUTS).read_text()).items():
        if not Path(file).is_file():
            changed.append(f"{was['role']} {file} is gone")
        elif _fingerprints(Path(file))[file] != {"sha256": was["sha256"], "size": was["size"]}:
            changed.append(f"{was['role']} {file} changed since the run")
    return changed


# ---------------------------------------------------------------------- the training log

LOG, EARLIER_LOG = "metrics.csv", "metrics.before-resume.csv"


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.exists():
        return [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _step(row: dict) -> int:
    return int(float(row.get("step") or 0))


def _joined_log(earlier: Path, later: Path) -> str | None:
    """The rows of ``earlier`` logged before the first step of ``later``, then ``later``'s, as CSV."""
    (early_keys, early_rows), (late_keys, late_rows) = _read_rows(earlier), _read_rows(later)
    if not early_rows and not late_rows:
        return None
    first = min((_step(r) for r in late_rows), default=None)
    rows = [r for r in early_rows if first is None or _step(r) < first] + late_rows
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(early_keys + late_keys)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _set_log_aside(work_dir: Path) -> None:
    """Before a resume: Lightning's CSV logger starts ``metrics.csv`` afresh, so the rows so far
    (with those kept from any earlier resume) wait in ``metrics.before-resume.csv``."""
    from adamerge.io.checkpoints import write_text

    text = _joined_log(work_dir / EARLIER_LOG, work_dir / LOG)
    if text is not None:
        write_text(work_dir / EARLIER_LOG, text)
    (work_dir / LOG).unlink(missing_ok=True)


def restore_log(work_dir: Path) -> None:
    """After training: ``metrics.csv`` holds every step's rows again, from the first attempt on."""
    from adamerge.io.checkpoints import write_text

    if (work_dir / EARLIER_LOG).exists():
        write_text(work_dir / LOG, _joined_log(work_dir / EARLIER_LOG, work_dir / LOG))
        (work_dir / EARLIER_LOG).unlink()


def _readable_checkpoint(last: Path) -> Path:
    """``last`` if it reads back (safely), else the newest earlier ``step*.ckpt`` that does; an
    unreadable checkpoint with nothing to fall back on is an error naming it."""
    from adamerge.io.checkpoints import UnreadableInput, load_checkpoint

    try:
        load_checkpoint(last)
        return last
    except UnreadableInput as error:
        problem = error
    earlier = sorted(last.parent.glob("step*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in earlier:
        try:
            load_checkpoint(candidate)
        except UnreadableInput:
            continue
        print(f"{problem}; resuming from the earlier {candidate.name} instead")
        return candidate
    raise UnreadableInput(f"{problem}; delete it to start this run over") from None
