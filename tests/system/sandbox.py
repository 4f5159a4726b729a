"""Boot the host's own systemd as PID 1 of a throw-away namespace, to test real units.

The build machines' PID 1 is not systemd; this runs `/lib/systemd/systemd`
in new mount, PID, cgroup, UTS, IPC and network namespaces, with util-linux
`unshare` and nothing downloaded (after ../shared/reference/systemd-sandbox.sh):

- The container's root is an overlay of `/` whose writes go to a tmpfs, so
  `dpkg -i`, /etc edits and the service's state vanish with it. Its network
  namespace has loopback only: nothing it runs can reach another machine.
- SAFETY: systemd as PID 1 moves every process of its root cgroup into
  init.scope. The unshare process is therefore moved into its own, new
  cgroup2 sub-group *before* it creates the cgroup namespace, so the
  container's root cgroup is that sub-group and nothing else is reparented.
  Systemd is never started outside it.
- /etc/systemd/system and /lib/systemd/system are empty tmpfs inside: the only
  units are a few stub targets, journald and dbus (copied from the host) and
  whatever is installed inside, such as the package's own unit. Nothing the
  host has enabled starts.
- `/` is made a shared mount inside before systemd starts: systemd sets up a
  service's credentials in a child mount namespace and moves them into place,
  and it only makes `/` shared itself when not in a container.
- Teardown kills PID 1 (the kernel then kills the whole PID namespace, so no
  process survives it; its mounts go with its mount namespace), waits for
  unshare, and removes the cgroup sub-group, which fails loudly if anything
  were left in it. Only processes this module started are signalled.
- If the test process dies, PR_SET_PDEATHSIG kills unshare, and
  `unshare --kill-child` then kills PID 1.

Known here (Debian 12, systemd 252): boot ~0.3 s, teardown < 0.2 s. The
watchdog, Restart=, DynamicUser, StateDirectory, LoadCredential, seccomp and
RestrictAddressFamilies are enforced.

Run as a script to poke around: `python3 tests/system/sandbox.py [COMMAND...]`
boots a sandbox, runs COMMAND inside (default: an interactive shell), and
tears it down.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")  # the manager binary
HOST_UNITS = Path("/lib/systemd/system")
COPIED_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "dbus.service",
    "dbus.socket",
)
# Stub targets: the boot graph is these and what they pull in, nothing else.
STUB_UNITS = {
    "sysinit.target": "[Unit]\nDescription=sysinit (stub)\n",
    "sockets.target": (
        "[Unit]\nDescription=sockets (stub)\n"
        "Wants=systemd-journald.socket systemd-journald-dev-log.socket dbus.socket\n"
    ),
    "basic.target": (
        "[Unit]\nDescription=basic (stub)\nRequires=sysinit.target sockets.target\n"
        "After=sysinit.target sockets.target\n"
    ),
    "sandbox.target": (
        "[Unit]\nDescription=sandbox\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n"
    ),
    "shutdown.target": (
        "[Unit]\nDescription=shutdown (stub)\nDefaultDependencies=no\nRefuseManualStart=yes\n"
    ),
    "multi-user.target": "[Unit]\nDescription=multi-user (stub)\n",
    "network-online.target": "[Unit]\nDescription=network-online (stub)\n",
}
INSIDE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 20.0  # seconds until the manager's private socket exists
RUN_TIMEOUT = 120.0  # default cap on one command run inside
PR_SET_PDEATHSIG = 1

# The container's first process: runs in the new namespaces, builds the root
# and execs systemd. $1 = work dir, $2 = cgroup2 sub-group (for the record),
# $3 = the unit search path.
STAGE1 = r"""#!/bin/bash
set -eu
W=$1 R=$1/root O=$1/ovl
mount -t tmpfs -o size=1g tmpfs $O; mkdir $O/upper $O/work
mount -t overlay overlay -o lowerdir=/,upperdir=$O/upper,workdir=$O/work $R
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount -t tmpfs -o mode=755,size=64m tmpfs $R/dev
for n in null zero full random urandom tty; do touch $R/dev/$n; mount --bind /dev/$n $R/dev/$n; done
mkdir $R/dev/pts $R/dev/shm; mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -s pts/ptmx $R/dev/ptmx; mount -t tmpfs tmpfs $R/dev/shm
: > $W/console.log; touch $R/dev/console; mount --bind $W/console.log $R/dev/console
mount -t tmpfs -o mode=755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
# Unit directories: empty, so only what is installed inside is there.
mount -t tmpfs -o mode=755 tmpfs $R/etc/systemd/system
mount -t tmpfs -o mode=755 tmpfs $R/lib/systemd/system
mkdir -p $R$W/units $R$W/share
mount --bind $W/units $R$W/units
mount --bind $W/share $R$W/share
hostname sandbox
cd $R; mkdir -p oldroot; pivot_root . oldroot; umount -l /oldroot; cd /
mount --make-rshared /
ip link set lo up 2>/dev/null || true
exec env -i container=sandbox PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  SYSTEMD_UNIT_PATH=$3 \
  /lib/systemd/systemd --unit=sandbox.target --log-target=journal-or-kmsg --show-status=no
"""

# A quick try of what booting needs, without systemd: namespaces and overlayfs.
PROBE = r"""set -e
mount -t tmpfs tmpfs "$1"; mkdir "$1/u" "$1/w" "$1/r"
mount -t overlay overlay -o lowerdir=/,upperdir="$1/u",workdir="$1/w" "$1/r"
"""


class SandboxError(RuntimeError):
    """The sandbox could not be booted, or a command inside it failed."""


def _cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (unified or hybrid layout), if anywhere."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def _own_cgroup2_path() -> str:
    """This process's cgroup2 path ("0::/path" in /proc/self/cgroup)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def unavailable_reason() -> str | None:
    """Why a systemd sandbox cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "systemd sandbox: Linux only"
    if os.geteuid() != 0:
        return "systemd sandbox: needs root (mount, unshare, cgroups)"
    for tool in ("unshare", "nsenter", "bash", "ip"):
        if shutil.which(tool) is None:
            return f"systemd sandbox: `{tool}` not found"
    if not SYSTEMD.resolve().is_file():
        return "systemd sandbox: /lib/systemd/systemd not found (apt-get install systemd)"
    if not (HOST_UNITS / "systemd-journald.service").is_file():
        return "systemd sandbox: /lib/systemd/system/systemd-journald.service not found"
    mount = _cgroup2_mount()
    if mount is None:
        return "systemd sandbox: no cgroup2 hierarchy mounted"
    if not os.access(mount / _own_cgroup2_path().lstrip("/"), os.W_OK):
        return "systemd sandbox: cannot create a cgroup2 sub-group (not writable)"
    with tempfile.TemporaryDirectory(prefix="tickguard-probe.") as tmp:
        probe = subprocess.run(
            [
                *("unshare", "--mount", "--propagation", "private", "--pid", "--fork"),
                *("--cgroup", "--uts", "--ipc", "--net", "sh", "-c", PROBE, "sh", tmp),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if probe.returncode != 0:
        why = " ".join(probe.stderr.split()) or f"exit {probe.returncode}"
        return f"systemd sandbox: unshare/overlayfs not permitted here ({why})"
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Sandbox:
    """One booted container; `run()` executes commands inside it; `close()` ends it."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="tickguard-sandbox."))
        self.share = self.work / "share"  # the same path inside: hand files in and out
        self.units = self.work / "units"
        # PID 1's unit search path: stubs first, then the (emptied) system dirs.
        self.unit_path = f"{self.units}:/etc/systemd/system:/run/systemd/system:/lib/systemd/system"
        mount = _cgroup2_mount()
        if mount is None:
            raise SandboxError("no cgroup2 hierarchy mounted")
        self.cgroup = mount / _own_cgroup2_path().lstrip("/") / self.work.name
        self.pid1: int | None = None
        self._unshare: subprocess.Popen[bytes] | None = None
        self._stderr = self.work / "unshare.err"

    # -- lifecycle -----------------------------------------------------------

    def boot(self) -> Sandbox:
        """Start systemd inside and wait until it runs; on failure, tear down and raise."""
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def _boot(self) -> None:
        self.units.mkdir()
        self.share.mkdir()
        (self.work / "root").mkdir()
        (self.work / "ovl").mkdir()
        for name, text in STUB_UNITS.items():
            (self.units / name).write_text(text)
        for name in COPIED_UNITS:
            if (HOST_UNITS / name).is_file():
                shutil.copy(HOST_UNITS / name, self.units / name)
        stage1 = self.work / "stage1.sh"
        stage1.write_text(STAGE1)
        stage1.chmod(0o755)
        self.cgroup.mkdir()
        # The wrapper shell joins the sub-group, then becomes unshare: the new
        # cgroup namespace is rooted at the sub-group.
        join_then_unshare = (
            'echo $$ > "$1/cgroup.procs" && exec unshare --kill-child --mount'
            ' --propagation private --pid --fork --cgroup --uts --ipc --net "$2" "$3" "$1" "$4"'
        )
        with open(self._stderr, "wb") as err:
            self._unshare = subprocess.Popen(
                [
                    *("sh", "-c", join_then_unshare, "sh"),
                    *(str(self.cgroup), str(stage1), str(self.work), self.unit_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                break
            pid = self._manager_pid()
            if pid is not None and Path(f"/proc/{pid}/root/run/systemd/private").is_socket():
                self.pid1 = pid
                break
            time.sleep(0.05)
        if self.pid1 is None:
            raise SandboxError(f"systemd did not come up:\n{self.diagnostics()}")
        # "running" or "degraded": either way the manager has finished booting.
        self.run("systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT)

    def _manager_pid(self) -> int | None:
        """The unshare child (the container's PID 1), once it has become systemd."""
        assert self._unshare is not None
        try:
            children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
            pids = children.read_text().split()
            if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                return int(pids[0])
        except (OSError, ValueError):
            pass
        return None

    def diagnostics(self) -> str:
        """unshare's stderr and the container console, for failure messages."""
        parts = []
        for path in (self._stderr, self.work / "console.log"):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Kill the container (only our PID 1 and unshare), remove its cgroup and files."""
        if self._unshare is not None:
            # Only if still ours: PID 1 of the namespace our unshare created.
            if (
                self.pid1 is not None
                and self._unshare.poll() is None
                and self._manager_pid() == self.pid1
            ):
                os.kill(self.pid1, signal.SIGKILL)
            if self._unshare.poll() is None:
                try:
                    self._unshare.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._unshare.kill()
                    self._unshare.wait(timeout=10)
            self._unshare = None
        self.pid1 = None
        leftover = self._remove_cgroup()
        shutil.rmtree(self.work, ignore_errors=True)
        if leftover:
            raise SandboxError(f"cgroup {self.cgroup} could not be removed: {leftover}")

    def _remove_cgroup(self) -> str:
        """rmdir the sub-group tree bottom-up, retrying while the dying processes leave."""
        if not self.cgroup.exists():
            return ""
        error = ""
        for _ in range(50):
            error = ""
            for d in sorted(
                (p for p in self.cgroup.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            ):
                try:
                    d.rmdir()
                except OSError as exc:
                    error = str(exc)
            try:
                self.cgroup.rmdir()
                return ""
            except OSError as exc:
                error = error or str(exc)
            time.sleep(0.1)
        return error

    def __enter__(self) -> Sandbox:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside --------------------------------------------------------------

    def run(
        self,
        *argv: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = RUN_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside (all namespaces, container root), with a clean environment."""
        if self.pid1 is None:
            raise SandboxError("the sandbox is not running")
        inside_env = {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "TERM": "dumb"}
        inside_env.update(env or {})
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=inside_env,
            check=False,
        )
        if check and result.returncode != 0:
            raise SandboxError(
                f"inside the sandbox, {' '.join(argv)!r} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside."""
        return self.run("sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create or replace a file inside (parents created), owned by root."""
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && umask 077 && cat > "$1" && chmod "$2" "$1"',
            "sh",
            path,
            f"{mode:o}",
            input=text,
        )

    def read(self, path: str) -> str:
        """A file's text, read inside."""
        return self.run("cat", path).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        args = [f"--property={p}" for p in properties]
        out = self.run("systemctl", "show", *args, unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *, since_cursor: str | None = None) -> str:
        """The unit's journal (messages only, including systemd's own about it)."""
        args = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        if since_cursor:
            args.append(f"--after-cursor={since_cursor}")
        self.run("journalctl", "--sync", check=False)
        return self.run(*args, check=False).stdout

    def journal_cursor(self) -> str:
        """A cursor for the journal's end: `journal(since_cursor=...)` shows what follows."""
        self.run("journalctl", "--sync", check=False)
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--no-pager", check=False)
        for line in out.stdout.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ").strip()
        return ""


def main(argv: Sequence[str]) -> int:
    """Boot a sandbox, run argv inside (default: an interactive shell), tear it down."""
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with Sandbox() as box:
        assert box.pid1 is not None
        print(f"sandbox up: PID 1 is {box.pid1}; work dir {box.work}", file=sys.stderr)
        command = list(argv) or ["bash", "-l"]
        return subprocess.call(["nsenter", "-t", str(box.pid1), "-a", *command])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
