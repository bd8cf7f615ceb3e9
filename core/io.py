"""Files that appear whole or not at all: the one atomic-write helper, the atomic output directory,
and the checks every tool runs on its output paths before any work.

Temporaries are named after the process that made them (``.NAME.tmp-PID.HOST-XXXX``): a run killed
with SIGKILL leaves them behind, and the next write of the same NAME removes those of dead
processes of this host. (SIGTERM is turned into an exception by ``tools._cli``, so the context
managers below clean up.) An output directory carries ``MARKER``, the list of what this tool wrote
there: ``--force`` replaces only such a directory, unchanged, and never one holding an input.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.errors import PassError, UserError

MARKER = ".arvgq-output"  # in every output directory: what was written there, so --force may replace it


def _host() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def _tag() -> str:
    """This process, in temporary names: ``PID.HOST`` (HOST: 6 hex digits of the host name)."""
    return f"{os.getpid()}.{_host()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def sweep_stale(parent: str | Path, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``parent`` (``.NAME.tmp-PID.HOST-*``) left by dead processes
    of this host (a SIGKILL, a power cut); returns what was removed. Live processes' and other hosts' stay."""
    parent, prefix = Path(parent), f".{name}.tmp-"
    pattern = re.compile(r"(\d+)\.([0-9a-f]{6})-")
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name[len(prefix):])
        if m is None or m.group(2) != _host() or _pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` (one rename) only if the block succeeds.

    Readers never see a half-written file, and a failed write leaves no temporary behind.
    ``suffix`` keeps the extension for writers that infer the format from it (PIL, onnx).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{_tag()}-", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def failed_dir(out: str | Path) -> Path:
    """Where a failed run's partial output (the dumps a user debugs with) is kept: ``OUT.failed/``."""
    out = Path(out)
    return out.with_name(out.name + ".failed")


# ---------------------------------------------------------------------------- output paths, checked first

def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return True  # e.g. a parent without search permission: the probe below names it


def check_writable(path: str | Path, flag: str, *, kind: str = "dir") -> Path:
    """Fail now, before any work, if ``path`` cannot be written; returns it as a Path.

    ``kind``: ``"dir"``, an output directory made beside its final place and renamed;
    ``"file"``, a file written atomically; ``"cache"``, a directory written into (``--calib-cache``).
    Refused: a file where a directory is needed (or the reverse), a parent that is a file, and a
    place where nothing can be created (read-only, no permission, ``/proc``).
    """
    path = Path(path)
    if kind not in ("dir", "file", "cache"):
        raise ValueError(f"unknown output kind {kind!r}")
    if _exists(path):
        if kind != "file" and not path.is_dir():
            raise UserError(f"{flag} {path} is an existing file, not a directory; give a directory path")
        if kind == "file" and path.is_dir():
            raise UserError(f"{flag} {path} is a directory; give a file path")
    place = path if kind == "cache" and path.is_dir() else path.parent
    while not _exists(place):  # the nearest existing ancestor: missing ones are created later
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{flag} {path}: {place} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=place, prefix=f".arvgq-probe.tmp-{_tag()}-"))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create files in {place}/ ({e.strerror or e})") from None
    return path


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False


def _listing(directory: Path) -> list[str]:
    """Every file and directory under ``directory``, as sorted relative POSIX paths (the marker excluded)."""
    names = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        names += [(rel / n).as_posix() for n in [*dirs, *files]]
    return sorted(n for n in names if n != MARKER)


def _ours(directory: Path) -> str | None:
    """None when ``directory`` is an output this tool wrote and nobody changed since, else why not."""
    try:
        recorded = json.loads((directory / MARKER).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return "was not written by this tool"
    extra = sorted(set(_listing(directory)) - set(recorded))
    if extra:
        return f"holds files this tool did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    return None


def check_output_dir(out: str | Path, *, force: bool, inputs: Iterable[str | Path] = (), flag: str = "--out") -> Path:
    """The checks of ``atomic_output_dir``, to run before any work: ``out`` can be made here, and an
    existing ``out`` may be replaced (``force``, a directory this tool wrote, unchanged, holding none of ``inputs``)."""
    out = check_writable(out, flag, kind="dir")
    _check_replaceable(out, force=force, inputs=inputs, flag=flag)
    return out


def _check_replaceable(out: Path, *, force: bool, inputs: Iterable[str | Path], flag: str) -> None:
    held = [str(p) for p in inputs if p and _inside(Path(p), out)]
    if held:
        raise UserError(f"{flag} {out} holds an input of this run ({held[0]}); write the output elsewhere")
    if not _exists(out):
        return
    if not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file, not a directory; give a directory path")
    if not force:
        raise UserError(f"output directory {out} exists; pass --force to replace it")
    why = _ours(out)
    if why is not None:
        raise UserError(f"{flag} {out} {why}; --force replaces only an output directory of this tool: "
                        f"choose another {flag} (or remove it yourself)")


def _mark(directory: Path) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": "arvg-quant", "entries": _listing(directory)}) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    An existing ``out`` is an error unless ``force``; then it is replaced at the very end, so a
    failed run leaves the old results, and only if this tool wrote it (``MARKER``), nothing was added
    to it since, and it holds none of ``inputs``. What a failed run did write (pass dumps) moves to
    ``OUT.failed/`` and the error says so; a run that failed before writing anything leaves nothing.
    """
    out = Path(out)
    inputs = list(inputs)
    _check_replaceable(out, force=force, inputs=inputs, flag="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{_tag()}-"))
    try:
        yield tmp
    except (UserError, PassError) as e:
        if not any(tmp.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = failed_dir(out)
        if _exists(kept) and _ours(kept) is not None:  # someone else's OUT.failed: never deleted
            shutil.rmtree(tmp, ignore_errors=True)
            raise type(e)(f"{e} (partial output not kept: {kept} exists and is not this tool's)") from e
        _mark(tmp)
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(tmp, kept)
        raise type(e)(f"{e} (partial output kept in {kept}/)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _mark(tmp)
        _check_replaceable(out, force=force, inputs=inputs, flag="--out")  # again: the run may have been long
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = failed_dir(out)
    if _exists(kept) and _ours(kept) is None:  # a good run replaces the last failure's leftovers
        shutil.rmtree(kept, ignore_errors=True)
    if _exists(out):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{_tag()}-"))  # renamed over: empty
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
