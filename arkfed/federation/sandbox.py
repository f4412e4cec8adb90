"""Keep a process from reading a few files of its own account (Linux Landlock, no privileges needed).

The coordinator's ServerApp runs as the coordinator's account, which owns ``ca.key`` and
``coordinator.key``. :func:`hide_files` makes those files unreachable for the calling process and
every process it starts, with Linux's Landlock LSM (kernel 5.13 or later, enabled in the kernel's
``lsm=`` list): the process keeps every other access its account has, but cannot read, write,
truncate, rename, link, or remove the hidden files, and cannot leave or loosen the sandbox.

Landlock only grants, so "everything but these files" is written as grants on everything around
them: for each folder from ``/`` down to a hidden file's folder, every other entry gets full
access (its whole subtree), and those folders themselves may be listed. What follows from that:

- files created *later* directly in one of those folders (``/``, ``/home``, the certificate
  folder's parent, ...) are out of reach of the sandboxed process; put its working folders (the
  run folder, ``TMPDIR``) elsewhere, never above or beside-and-inside the certificate folder;
- a hidden file that is also reachable through another path (a hard link, a bind mount of its
  folder elsewhere) stays readable there: :func:`hide_files` refuses a file with several links;
- Landlock also stops the process from ptracing, or reading the memory or ``/proc/PID/root`` of,
  any process outside its sandbox (such as the coordinator process that holds the key in memory).

Without Landlock (another OS, an old kernel, or Landlock disabled) :func:`hide_files` raises
:class:`SandboxUnavailable`; the caller reports that the files stay readable.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
from pathlib import Path
from typing import Iterable

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # the same number on every Linux architecture
PR_SET_NO_NEW_PRIVS = 38
RULE_PATH_BENEATH = 1
CREATE_RULESET_VERSION = 1

# access rights (uapi/linux/landlock.h) and the Landlock ABI version that introduced them
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ABI1_ALL = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what applies to a file that is not a folder


class SandboxUnavailable(Exception):
    """Landlock is not available here (not Linux, an old kernel, or disabled)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(version), 0)


def handled_rights(abi: int) -> int:
    rights = ABI1_ALL
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def plan_grants(hidden: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(entries granted full access, folders that may only be listed) to hide ``hidden``."""
    hidden = {Path(os.path.realpath(p)) for p in hidden}
    chain: set[Path] = set()
    for path in hidden:
        chain.update(path.parents)
    grants = []
    for folder in sorted(chain):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if path in chain or path in hidden or entry.is_symlink():  # a link is followed to where it points
                continue
            grants.append(path)
    return grants, sorted(chain)


def _add_rule(libc, ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # vanished since it was listed: nothing to grant
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        attr = _PathBeneathAttr(rights, fd)
        if libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
    finally:
        os.close(fd)


def hide_files(paths: Iterable[str | Path]) -> int:
    """Hide the existing files among ``paths`` from this process and its children (see the module
    docstring); returns how many. Call it while the process is single-threaded: Landlock restricts
    the calling thread and the threads and processes it starts afterwards."""
    abi = abi_version()
    if abi < 1:
        raise SandboxUnavailable("Landlock is not available (Linux 5.13+ with Landlock enabled is needed)")
    if len(os.listdir("/proc/self/task")) > 1:  # threads already running would stay outside the sandbox
        raise SandboxUnavailable("the process already runs several threads; hide files before starting any")
    hidden = []
    for path in paths:
        info = os.stat(path) if os.path.exists(path) else None
        if info is None:
            continue
        if info.st_nlink > 1:
            raise SandboxUnavailable(f"{path} has {info.st_nlink} hard links: it cannot be hidden at one path")
        hidden.append(Path(path))
    if not hidden:
        return 0
    libc = _libc()
    rights = handled_rights(abi)
    attr = _RulesetAttr(rights)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise SandboxUnavailable(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        grants, folders = plan_grants(hidden)
        for path in grants:
            _add_rule(libc, ruleset, path, rights)
        for folder in folders:
            _add_rule(libc, ruleset, folder, READ_DIR)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return len(hidden)
