"""Atomic writes: a reader sees the old file or the new one, never half of one.

Files are written to a temporary name in the same directory, flushed to disk and renamed
over the target (``os.replace`` is atomic on POSIX and Windows). Directories (saved models,
reports) are built under a temporary name and renamed into place when complete.

Replacing a directory. On Linux the new directory and the old one swap names in one step
(``renameat2(RENAME_EXCHANGE)``), so the target is never missing, even if the process is
killed. Elsewhere (or on a file system without the exchange) the old directory is renamed to
``.<name>.old`` next to it, the new one renamed in, then the old one deleted; a process killed
between the two renames leaves the target missing and ``.<name>.old`` complete, and the next
write (or :func:`recover_directory`) renames it back.

A write that fails for a reason of the system (read-only, disk full, a file where a folder
should be) raises :class:`~lakead.errors.LakeadError` naming the target and the cause; nothing
half-written is left at the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LakeadError


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


#: Temporary files and directories are created private (0600 / 0700); they get the usual
#: permissions (0666 / 0777 less the umask) before they are renamed into place.
_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


class TargetExistsError(LakeadError, FileExistsError):
    """The target of a write is in the way: a file where a directory goes, or a directory
    that may not be replaced."""


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file (not folder) at ``path`` or at the nearest existing folder above it, if any:
    what keeps ``path`` from being made as a folder."""
    p = Path(path)
    for above in (p, *p.parents):
        if os.path.lexists(above):
            return above if not above.is_dir() else None
    return None


def check_directory_target(path: str | os.PathLike) -> None:
    """Raise :class:`TargetExistsError` now, before any work, when ``path`` cannot become a
    directory because it, or a folder above it, is a file."""
    f = file_in_the_way(path)
    if f is not None:
        raise TargetExistsError(f"{path}: exists and is not a directory" if f == Path(path)
                                else f"{path}: cannot write: {f} is a file, not a folder")


def write_error(target: str | os.PathLike, exc: OSError) -> LakeadError:
    """A system error of writing ``target`` as one message naming the target and the cause
    (and the file the system named, when it is another one)."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and (f := file_in_the_way(exc.filename or target)):
        return LakeadError(f"{target}: cannot write: {f} is a file, not a folder")
    cause = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and os.fspath(exc.filename) != os.fspath(target) else ""
    return LakeadError(f"{target}: cannot write: {cause}{where}")


def os_error_text(exc: OSError) -> str:
    """A system error (read-only, disk full, a file in the way) as one line naming the path."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename and (f := file_in_the_way(exc.filename)):
        return f"{exc.filename}: cannot write: {f} is a file, not a folder"
    paths = [str(f) for f in (exc.filename, exc.filename2) if f]
    return f"{' -> '.join(paths) or 'cannot write'}: {exc.strerror or exc or type(exc).__name__}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parents are created)."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), FILE_MODE)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(target, exc) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _old_name(target: Path) -> Path:
    """Where the old directory waits while a replacement is swapped in (the fallback)."""
    return target.with_name(f".{target.name}.old")


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo a replacement that a killed process left half done: when ``path`` is missing and
    its ``.<name>.old`` is there, rename it back (when both are there, the old one is only
    left over and is deleted). Returns whether ``path`` was renamed back."""
    target = Path(path)
    old = _old_name(target)
    if not old.is_dir():
        return False
    if os.path.lexists(target):
        shutil.rmtree(old, ignore_errors=True)
        return False
    try:
        os.rename(old, target)
    except OSError:  # another process recovered it first, or we may not: nothing to do
        return False
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False when the system or the file system cannot, and nothing was done."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, some others)
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here: fall back to two renames
    raise OSError(code, os.strerror(code), os.fspath(b))


def _usual_permissions(root: Path) -> None:
    """Files and folders built under ``root`` get the usual permissions (0666 / 0777 less the
    umask), whatever the library that wrote them chose (safetensors writes 0600)."""
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(folder, d)
            if not os.path.islink(p):
                os.chmod(p, DIR_MODE)
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)
    os.chmod(root, DIR_MODE)


#: A temporary directory of an interrupted write this old is a leftover (the service's
#: models folder uses the same age).
STALE_SECONDS = 3600.0


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what a killed :func:`atomic_directory` left beside ``target``: directories named
    exactly as it names them (``.NAME.`` + 8 characters of ``tempfile`` + ``.tmp``) and older
    than :data:`STALE_SECONDS` (a younger one may be another process's write in progress).
    Nothing else is touched. Returns what was removed."""
    import re
    import time

    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        try:
            if (pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                    and now - e.stat(follow_symlinks=False).st_mtime > STALE_SECONDS):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True,
                     before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` only on success.

    On any exception the temporary directory is removed and an existing ``path`` is left as
    it was. When ``path`` exists and ``overwrite`` is true, it is replaced (see the module
    docstring: one exchange of names on Linux, else two renames that the next write undoes
    if a kill falls between them), so ``path`` is at every moment the complete old directory
    or the complete new one. Files in it get the usual permissions. ``before_replace`` is
    called once the new directory is complete, just before it is put in place (an exception
    from it leaves ``path`` as it was). Which directories may be replaced is decided by
    :mod:`lakead.outputs`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(target, exc) from None
    recover_directory(target)
    remove_stale_temporaries(target)
    if target.exists() and not target.is_dir():
        raise TargetExistsError(f"{target}: exists and is not a directory")
    if target.exists() and not overwrite:
        raise TargetExistsError(f"{target}: already exists")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        yield tmp
        if before_replace is not None:
            before_replace()
        _usual_permissions(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        else:
            old = _old_name(target)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, LakeadError):  # a refusal is already a message
            raise write_error(target, exc) from None
        raise
