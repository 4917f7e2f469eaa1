"""Writing a store folder without ever losing one: what --out may name, how a store is replaced, what a killed
run left behind.

    NAME/                      the store (manifest.json with our format name)
    .NAME.tmp-<pid>-<rand>/    a conversion in progress; holds MARK ("<pid> <host>") until it is renamed in
    .NAME.old-<pid>/           the store being replaced, for the instant between the two renames

A replace renames the old store aside, the new one in, then removes the aside: a crash leaves either store
complete, and the next run restores an aside that has no store in its place. Leftovers are removed only when
their name, their marker (or manifest) and a dead owning process all say they are ours.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError

MANIFEST, FORMAT_NAME = "manifest.json", "moe-offload-store"
MARK = ".moe-offload-tmp"  # inside every temporary store folder: "<pid> <host>" of the writer


def is_our_store(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def check_out(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an --out that would destroy the source or something that is not a store of ours."""
    model, out = Path(model), Path(out)
    m, o = model.resolve(), out.resolve()
    how = "is" if o == m else "contains" if o in m.parents else "lies inside" if m in o.parents else None
    if how:
        raise UsageError(f"--out {out} {how} --model {model}: pick an --out outside the model folder")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UsageError(f"{out} already exists; remove it or pick another --out (or pass --overwrite)")
    if not o.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; --overwrite replaces only expert stores")
    if not is_our_store(o) and any(o.iterdir()):
        raise UsageError(f"--out {out} is not an expert store (no {MANIFEST} of ours) and not empty; "
                         "--overwrite replaces only expert stores")


def _owner(text: str) -> tuple[int, str] | None:
    parts = text.split()
    return (int(parts[0]), parts[1]) if len(parts) == 2 and parts[0].isdigit() else None


def _dead(pid: int, host: str) -> bool:
    """True only when `pid` on this host surely no longer runs (another host's process: never)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _pid_of(name: str, prefix: str) -> int | None:
    tail = name[len(prefix):].split("-")[0]
    return int(tail) if tail.isdigit() else None


def recover(final: Path) -> None:
    """Put back a store that a killed replace left aside; remove stale temporaries and asides of `final`."""
    parent = final.parent
    if not parent.is_dir():
        return
    host = socket.gethostname()
    old, tmp = f".{final.name}.old-", f".{final.name}.tmp-"
    for p in sorted(parent.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(old):
            pid = _pid_of(p.name, old)
            if pid is None or not _dead(pid, host) or not is_our_store(p):
                continue
            if final.exists() or final.is_symlink():
                shutil.rmtree(p)
            else:
                os.rename(p, final)
                print(f"moe-offload: restored {final} from {p.name}, left by an interrupted run",
                      file=sys.stderr)
        elif p.name.startswith(tmp):
            try:
                owner = _owner((p / MARK).read_text())
            except OSError:
                continue  # no marker: not ours (or ours, complete and being renamed in): leave it
            if owner is not None and _dead(*owner):
                shutil.rmtree(p, ignore_errors=True)


@contextmanager
def store_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `final`; when the block completes, it replaces `final` (rename aside,
    rename in, remove the aside). On an error the temporary folder goes and `final` is as it was."""
    final = Path(final)
    if final.is_symlink():  # replace the store it points to, not the link
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists; remove it or pick another --out (or pass --overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    (tmp / MARK).write_text(f"{os.getpid()} {socket.gethostname()}")
    try:
        yield tmp
        replace(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename `tmp` to `final`; an existing `final` (a store of ours) goes aside first and is removed last."""
    aside = None
    if final.exists():
        if not overwrite or not (is_our_store(final) or not any(final.iterdir())):
            raise UsageError(f"{final} appeared while converting and is not ours to replace; the new store "
                             f"was not kept")
        aside = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    (final / MARK).unlink(missing_ok=True)
    if aside is not None:
        shutil.rmtree(aside)
