"""The sandbox's first process: confines itself, then runs the script (see sandbox.py).

Run by sandbox.py as `python -I sandbox_boot.py CONFIG_JSON`, as root, with the standard
library only (seccomp.py is loaded from this file's directory by path, so importing the
nanoseek package is not needed). Two modes:

- isolated (the first process of fresh network, PID and mount namespaces): every mount is
  made read-only, fresh tmpfs cover /tmp, /var/tmp and /dev/shm, an interpreter that lived
  under them is bound back read-only, the script is copied to /tmp/work (on the tmpfs, so
  its files are bounded and vanish with the namespace), and it runs as a child that drops
  to `nobody`, sets no_new_privs and the seccomp filter just before exec. Its exit status
  is written to a file: unshare re-raising a child's fatal signal itself is unreliable.
- unisolated (no namespaces, an explicit opt-in): drop to `nobody` (when root), set
  no_new_privs and the seccomp filter without AF_INET, and exec the script in place.

Any set-up step that fails stops here (exit 125, the reason on stderr): a script never
runs with less confinement than the mode promises.
"""

import ctypes
import importlib.util
import json
import os
import re
import subprocess
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
         "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_libc = ctypes.CDLL(None, use_errno=True)


def main(cfg: dict) -> None:
    spec = importlib.util.spec_from_file_location("_nanoseek_seccomp",
                                                  os.path.join(os.path.dirname(__file__), "seccomp.py"))
    seccomp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seccomp)
    # isolated: no filter, no run (raises here); unisolated: as the caller found it (seccomp.machine())
    prog = seccomp.program(allow_inet=True) if cfg["isolated"] else (
        seccomp.program(allow_inet=False) if cfg["seccomp"] else None)
    argv = [cfg["python"], "-I", "main.py"]

    def confine():
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        if prog is not None:
            seccomp.install(prog)

    if not cfg["isolated"]:
        confine()
        os.execv(argv[0], argv)
    # opened by sandbox.py, outside the namespace: a file opened for writing here would keep
    # its mount busy (EBUSY) when remounted read-only
    status = os.fdopen(cfg["status_fd"], "w")
    code = open("main.py", "rb").read()  # the cwd, about to be hidden too
    sources = {d: os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in cfg["binds"]}
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _read_only_everywhere()
    for d in PRIVATE_DIRS:
        if os.path.isdir(d):
            _mount("tmpfs", d, MS_NOSUID | MS_NODEV, "tmpfs", "size=64m,mode=1777")
    for d, fd in sources.items():  # an interpreter under /tmp, seen again (read-only)
        os.makedirs(d, 0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", d, MS_BIND)
        _mount(None, d, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    os.mkdir("/tmp/work", 0o700)
    with open("/tmp/work/main.py", "wb") as f:
        f.write(code)
    for p in ("/tmp/work", "/tmp/work/main.py"):
        os.chown(p, cfg["uid"], cfg["uid"])
    os.chdir("/tmp/work")
    status.write(str(subprocess.run(argv, preexec_fn=confine).returncode))
    status.close()


def _read_only_everywhere() -> None:
    """Remount every mount point read-only (keeping its other flags), then check each one
    that can be reached is: what is not, stops the sandbox."""
    points, errors = _mount_points(), {}
    for mp, opts in points.items():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for o in opts:
            flags |= _KEEP.get(o, 0)
        try:
            _mount(None, mp, flags)
        except OSError as e:  # judged below: only a mount that cannot be reached may stay writable
            errors[mp] = e
    for mp in points:
        try:
            st = os.statvfs(mp)
        except OSError:
            continue
        if not st.f_flag & os.ST_RDONLY:
            raise OSError(f"could not make {mp} read-only ({errors.get(mp, 'remounted, still writable')})")


def _mount_points() -> dict[str, list[str]]:
    """Mount point -> its per-mount options, from /proc/self/mountinfo (octal escapes decoded)."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out[mp] = fields[5].split(",")
    return out


def _mount(source, target: str, flags: int, fstype=None, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source or ''} on {target}: {os.strerror(e)}")


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as e:  # noqa: BLE001 - the reason goes to the run's stderr
        print(f"sandbox set-up failed: {e}", file=sys.stderr)
        sys.exit(125)
