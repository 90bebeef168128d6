"""The booted Debian guest of the host test: QEMU (TCG), a tap on a bridge, SSH.

    with Guest(workdir) as g:        # bridge + tap + QEMU on a snapshot of the image
        g.wait_ssh()                 # boot time in g.boot_s
        g.ssh("systemctl is-system-running --wait")
        g.reboot()

* The cached image (tests/host/image.py) is never written: QEMU runs it with snapshot=on
  (writes go to a temporary overlay that lives as long as the QEMU process, reboots
  included), so every run starts from the same fresh host.
* No bootloader: QEMU loads the image's own kernel and initramfs (-kernel/-initrd) with
  root=/dev/vda; a reboot inside the guest resets QEMU, which boots the same way again.
* Network: the test's bridge BRIDGE with HOST_IP/24 and the guest's tap on it; the guest
  has GUEST_IP and no default route, so its only peer is this host's bridge address.
* SSH: an ed25519 key made for this run; its public half goes to the guest on the kernel
  command line (stockade.sshkey=..., installed as root's authorized_keys at boot).
* Everything made here (QEMU by PID, tap, bridge, overlay, key) is removed on exit, also
  after a failure.
"""
from __future__ import annotations

import base64
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from . import image

QEMU = "qemu-system-x86_64"
BRIDGE = "hosttbr0"
TAP = "hostttap0"
GUEST_MAC = "52:54:00:5e:17:02"


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Guest:
    def __init__(self, workdir: Path, *, memory_mb: int = 3072, smp: int = 2):
        self.dir = Path(workdir)
        self.memory_mb, self.smp = memory_mb, smp
        self.key = self.dir / "id_ed25519"
        self.console_log = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.boot_s: float | None = None
        self.addr = image.GUEST_IP

    # -- set-up ----------------------------------------------------------------------

    def _network(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{image.HOST_IP}/{image.PREFIX}", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        run("ip", "tuntap", "add", TAP, "mode", "tap")
        run("ip", "link", "set", TAP, "master", BRIDGE)
        run("ip", "link", "set", TAP, "up")

    def _teardown_network(self) -> None:
        run("ip", "link", "del", TAP, check=False)
        run("ip", "link", "del", BRIDGE, check=False)

    def start(self) -> "Guest":
        meta = image.build()
        p = image.paths()
        self.kernel_version = meta["kernel"]
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stockade-host-test",
                "-f", str(self.key))
        self._network()
        pub = base64.b64encode(self.key.with_suffix(".pub").read_bytes().strip()).decode()
        append = (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 quiet "
                  f"systemd.show_status=false stockade.sshkey={pub}")
        self.t_start = time.monotonic()
        qlog = open(self.dir / "qemu.log", "ab")
        self.proc = subprocess.Popen([
            QEMU, "-accel", "tcg,thread=multi", "-smp", str(self.smp), "-cpu", "max",
            "-m", str(self.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(p["kernel"]), "-initrd", str(p["initrd"]), "-append", append,
            "-drive", f"file={p['rootfs']},if=virtio,format=raw,cache=unsafe,snapshot=on",
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.console_log}",
        ], stdout=qlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None
        self._teardown_network()

    def __enter__(self) -> "Guest":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- SSH -------------------------------------------------------------------------

    @property
    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"]

    def ssh_run(self, command: str, timeout: float = 300, tries: int = 4,
                connect_timeout: int = 30) -> subprocess.CompletedProcess:
        """ssh exits 255 when it cannot connect (a guest busy under TCG can miss the banner
        timeout): that is retried, never the command's own failure."""
        for attempt in range(tries):
            proc = subprocess.run(["ssh", *self.ssh_options, "-o", f"ConnectTimeout={connect_timeout}",
                                   f"root@{self.addr}", command],
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 255 or attempt == tries - 1:
                return proc
            time.sleep(3)
        return proc

    def ssh(self, command: str, timeout: float = 300) -> str:
        """Run ``command`` in the guest as root; its stdout, or an error with both streams."""
        proc = self.ssh_run(command, timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"guest: {command!r} exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def put(self, local: Path, remote: str) -> None:
        run("scp", "-q", *self.ssh_options, str(local), f"root@{self.addr}:{remote}",
            timeout=300)

    def wait_ssh(self, timeout: float = 600) -> float:
        """Until SSH answers; returns (and records) seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited: {self.log_tail()}")
            try:
                if self.ssh_run("true", timeout=60, tries=1, connect_timeout=5).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SSH after {timeout} s: {self.log_tail()}")
            time.sleep(2)
        self.boot_s = round(time.monotonic() - self.t_start, 1)
        return self.boot_s

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").strip()

    def reboot(self, timeout: float = 600) -> float:
        """Reboot from inside; returns seconds from the reboot command to SSH again."""
        before = self.boot_id()
        self.ssh_run("systemctl reboot", timeout=30)
        self.t_start = time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(3)
            self.wait_ssh(timeout=max(1.0, deadline - time.monotonic()))
            try:
                if self.boot_id() != before:
                    return self.boot_s or 0.0
            except RuntimeError:
                pass

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def inventory(self, path: Path, **hostvars) -> Path:
        """An Ansible inventory naming this guest (YAML)."""
        import yaml
        host = {"ansible_host": self.addr, "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": " ".join(shlex.quote(o) for o in self.ssh_options[2:]),
                "ansible_python_interpreter": "/usr/bin/python3", **hostvars}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"all": {"hosts": {"guest": host}}}, sort_keys=True))
        return path


def environ_without_ssh_agent() -> dict:
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    return env
