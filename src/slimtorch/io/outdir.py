"""Output folders that appear whole or not at all.

A job writes everything (model, report, plots, checkpoints) into a staging folder beside the output,
``.<name>.partial-<pid>`` (or ``.<name>.partial`` for jobs that resume, so the next run finds it), and
:meth:`StagedOutput.commit` renames it into place. An existing output is replaced only with
``overwrite``: it is renamed aside, the new folder renamed in, and the old one deleted, with SIGINT and
SIGTERM held back for those few calls. So a run, failed or interrupted at any moment, leaves the previous
output as it was or the complete new one; never a mix, never a half-written file under the output name.

Everything that can be checked without doing the work is checked when the object is prepared: the path
names a folder (not empty, not a file, not under a file), the output does not exist yet (or
``overwrite``), and the staging folder can be created, which proves the parent is writable.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slimtorch.errors import SlimError, shown

HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done (they are then delivered as usual)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no POSIX signals
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def umask_mode(path: Path, mode: int) -> None:
    """Give ``path`` the mode a plain open/mkdir would (mkstemp/mkdtemp ignore the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


class StagedOutput:
    """An output folder written through a staging folder. Use :meth:`prepare` before any work, write into
    :attr:`staging`, then :meth:`commit`; :meth:`abort` (or leaving the ``with`` block by an exception)
    removes the staging folder unless ``resumable``."""

    def __init__(self, out: Path | str, overwrite: bool = False, resumable: bool = False, flag: str = "--out"):
        if str(out).strip() == "":
            raise SlimError(f"{flag} is empty; give a folder")
        self.out = Path(out).absolute()
        self.overwrite, self.resumable, self.flag = overwrite, resumable, flag
        self.staging: Path | None = None
        self._made_parents: list[Path] = []

    @property
    def resume_folder(self) -> Path:
        """The staging folder of a resumable job: kept when the job fails, so the next run can resume."""
        return self.out.parent / f".{self.out.name}.partial"

    def check(self) -> None:
        """The checks of :meth:`prepare` that create nothing."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise SlimError(f"{self.flag} {out} is a file; give a folder (it is created if missing)")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise SlimError(f"{self.flag} {out} exists and is not empty; give a new folder, or --overwrite to "
                            f"replace it")
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise SlimError(f"{self.flag} {out} lies under {parent}, which is a file")
                break

    def prepare(self) -> StagedOutput:
        """Check the destination and create the staging folder (and any missing parents)."""
        self.check()
        missing = [p for p in self.out.parents if not p.exists()]
        with signals_held():
            self._make(missing)
        return self

    def _make(self, missing: list[Path]) -> None:
        try:
            for p in reversed(missing):
                p.mkdir()
                self._made_parents.insert(0, p)
            if self.resumable:
                self.staging = self.resume_folder
                self.staging.mkdir(exist_ok=True)
            else:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            umask_mode(self.staging, 0o777)
        except OSError as exc:
            self.abort()
            raise SlimError(f"cannot write {self.flag} {self.out}: {shown(exc.strerror or exc)}") from None

    def commit(self) -> Path:
        """Move the staging folder into place (replacing an old output) and return the output path."""
        assert self.staging is not None, "prepare() first"
        with signals_held():
            old = None
            if self.out.exists():
                if not self.overwrite and any(self.out.iterdir()):
                    raise SlimError(f"{self.flag} {self.out} appeared while the job ran; the result is in "
                                    f"{self.staging}")
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
                os.replace(self.out, old / "out")
            os.replace(self.staging, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.staging, self._made_parents = None, []
        return self.out

    def abort(self) -> None:
        """Remove the staging folder (kept when resumable and it holds a file, a checkpoint to resume from)
        and the parents prepare() created."""
        with signals_held():
            keep = self.resumable and self.staging is not None and any(p.is_file() for p in self.staging.rglob("*"))
            if self.staging is not None and not keep:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            if self.staging is None:
                for p in self._made_parents:
                    try:
                        p.rmdir()
                    except OSError:
                        break
            self._made_parents = []

    def __enter__(self) -> Path:
        if self.staging is None:
            self.prepare()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False
