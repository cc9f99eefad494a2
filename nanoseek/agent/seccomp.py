"""A seccomp filter for the sandbox's scripts: the system calls they have no use for fail.

A classic-BPF program built here and installed with prctl(PR_SET_SECCOMP) through ctypes
(no libseccomp binding needed), after prctl(PR_SET_NO_NEW_PRIVS) — which seccomp requires
of an unprivileged process, and which makes set-uid binaries run without their privilege.
The filter is inherited by every process the script starts and cannot be removed.

Refused with EPERM (Python raises PermissionError), and why:

- socket() of any family but AF_INET/AF_INET6 (and of those too with `allow_inet=False`,
  the mode without a network namespace): no unix socket, so no connecting to a host
  daemon's socket (a world-writable one under /run was reached before), no netlink, no
  raw packets. socketpair() only of stream/seqpacket type: asyncio and multiprocessing
  use them; a datagram pair could be re-addressed to a host socket with sendto().
- unshare, setns, clone with a CLONE_NEW* flag: no new namespaces (a user namespace gives
  its creator every capability inside it, the usual first step of a kernel exploit).
  clone3 fails with ENOSYS instead: its flags sit behind a pointer a filter cannot read,
  and libc then falls back to clone, which is checked.
- mount, umount2, pivot_root, chroot and the new mount API (open_tree, move_mount, fsopen,
  fsconfig, fsmount, fspick, mount_setattr): the sandbox's mounts stay as they were made.
- ptrace, process_vm_readv/writev, kcmp, pidfd_getfd: reading or steering other processes.
- keyctl, add_key, request_key: the kernel keyrings are not namespaced.
- bpf, perf_event_open, userfaultfd, io_uring_setup/enter/register: large kernel attack
  surface; io_uring would also run socket/connect operations this filter never sees.
- setsid, setpgid: every process the script starts stays in its process group, so killing
  the group kills them all (what contains daemons where there is no PID namespace).
- kill(-1, ...): signalling every process of the same user.
- System V IPC (shmget, semget, msgget and their operations) and POSIX message queues
  (mq_open ...): their objects outlive the process and, without an IPC namespace (the
  unisolated mode), are the host's: a segment or queue made by one script was read by the
  next run and stayed on the host. (multiprocessing's semaphores use /dev/shm, not these.)
- what only root does (module loading, kexec, reboot, swapon/off, acct, quotactl, syslog,
  iopl/ioperm, open_by_handle_at, name_to_handle_at): refused even if root is regained.

System calls of another ABI (i386 through int 0x80 on x86_64, arm32 on aarch64) kill the
process: their numbers differ, so the checks above would not apply to them; x32 calls on
x86_64 fail. Supported: x86_64 and aarch64 (`machine()` is None elsewhere: the sandbox
then refuses to call itself isolated).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
import sys

# seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH = 0, 4
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_LD_ABS, _AND, _JEQ, _JGE, _JSET, _RET = 0x20, 0x54, 0x15, 0x35, 0x45, 0x06
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_X32_BIT = 0x40000000
AF_INET, AF_INET6 = 2, 10
SOCK_STREAM, SOCK_SEQPACKET, SOCK_TYPE_MASK = 1, 5, 0xF
CLONE_NEW = 0x7E020000   # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64, aarch64) — from the kernel's unistd_64.h and asm-generic/unistd.h
_NUMBERS = {
    "socket": (41, 198), "socketpair": (53, 199), "clone": (56, 220), "clone3": (435, 435),
    "kill": (62, 129), "setsid": (112, 157), "setpgid": (109, 154),
    "unshare": (272, 97), "setns": (308, 268),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "pidfd_getfd": (438, 438),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
    "syslog": (103, 116), "iopl": (172, None), "ioperm": (173, None),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "mq_unlink": (241, 181), "mq_timedsend": (242, 182),
    "mq_timedreceive": (243, 183), "mq_notify": (244, 184), "mq_getsetattr": (245, 185),
}
_CHECKED = ("socket", "socketpair", "clone", "clone3", "kill")   # by their arguments, below
DENIED = tuple(n for n in _NUMBERS if n not in _CHECKED)


def machine() -> str | None:
    """This process's architecture if the filter knows it (a 64-bit Python on x86_64 or
    aarch64), else None."""
    m = platform.machine().lower()
    m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    ok = sys.platform == "linux" and m in AUDIT_ARCH and struct.calcsize("P") == 8
    return m if ok else None


def syscall_numbers(arch: str | None = None) -> dict[str, int]:
    """Name -> number on `arch` (this machine's by default) of every call the filter checks."""
    col = ("x86_64", "aarch64").index(arch or machine())
    return {n: nrs[col] for n, nrs in _NUMBERS.items() if nrs[col] is not None}


def program(allow_inet: bool, arch: str | None = None) -> bytes:
    """The filter as `struct sock_filter[]`: checks of the ABI, then of each call."""
    arch = arch or machine()
    if arch is None:
        raise OSError(f"seccomp: no filter for this architecture ({platform.machine()})")
    nr = syscall_numbers(arch)
    eperm, allow = _RET_ERRNO | errno.EPERM, _RET_ALLOW
    ins = [(_LD_ABS, 0, 0, _ARCH), (_JEQ, 1, 0, AUDIT_ARCH[arch]), (_RET, 0, 0, _RET_KILL_PROCESS),
           (_LD_ABS, 0, 0, _NR)]
    if arch == "x86_64":
        ins += [(_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, eperm)]
    for name in DENIED:
        if name in nr:
            ins += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, eperm)]
    inet = [(_JEQ, 2, 0, AF_INET), (_JEQ, 1, 0, AF_INET6)] if allow_inet else []
    ins += _on(nr["socket"], [_arg(0)] + inet + [(_RET, 0, 0, eperm), (_RET, 0, 0, allow)])
    ins += _on(nr["socketpair"], [_arg(1), (_AND, 0, 0, SOCK_TYPE_MASK), (_JEQ, 2, 0, SOCK_STREAM),
                                  (_JEQ, 1, 0, SOCK_SEQPACKET), (_RET, 0, 0, eperm), (_RET, 0, 0, allow)])
    ins += _on(nr["clone"], [_arg(0), (_JSET, 0, 1, CLONE_NEW), (_RET, 0, 0, eperm), (_RET, 0, 0, allow)])
    ins += _on(nr["kill"], [_arg(0), (_JEQ, 0, 1, 0xFFFFFFFF), (_RET, 0, 0, eperm), (_RET, 0, 0, allow)])
    ins += [(_JEQ, 0, 1, nr["clone3"]), (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS), (_RET, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


def _on(number: int, body: list) -> list:
    """`body` (which returns on every path) for system call `number`; others skip it."""
    return [(_JEQ, 0, len(body), number)] + body


def _arg(i: int) -> tuple:
    """Load the low 32 bits of argument i (the int the kernel reads for these calls)."""
    return (_LD_ABS, 0, 0, 16 + 8 * i + (4 if sys.byteorder == "big" else 0))


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(prog: bytes) -> None:
    """Set no_new_privs, then the filter, on this process (and what it execs or forks)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    zero = ctypes.c_ulong(0)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
