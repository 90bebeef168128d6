"""Real QEMU (TCG) virtual machines for Stockade's root tests.

    kernel, initrd = vm_images()                 # cached under /var/cache/stockade-test/vm
    with QemuVM("skvm1", tap="skvm1t0", mac="52:54:00:5e:00:01", ip="10.88.250.11/16",
                bridge="cni-podman0") as vm:
        vm.sh("ip -o addr")                      # runs inside the guest, returns its output
        vm.sh("httpd -p 8080 -h /www")

* Kernel: Debian's cloud kernel, fetched by `apt-get download linux-image-<ver>-cloud-amd64`
  (the version the linux-image-cloud-amd64 meta-package points at) and `dpkg -x`'d once.
* Initramfs: built here from busybox-static: /init insmods virtio_ring, virtio,
  virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, failover, net_failover,
  virtio_net (that order), configures eth0 from the kernel command line
  (stockade.ip=ADDR/LEN, stockade.gw=ADDR) and runs a control loop on the second serial
  port (ttyS1): each line received is run by sh, its output is followed by a line
  "@@RC <token> <exit status>@@". Kernel messages go to ttyS0 (a log file for plain QEMU).
* Plain QEMU VMs get their own tap (ip tuntap), put on ``bridge``; the tap and the QEMU
  process (by PID) are removed on exit, also after a failure.
* Addresses reserved for VM tests on Podman's 10.88.0.0/16: 10.88.250.0/24 (VMs) and
  10.88.251.0/24 (namespace workloads on the same bridge). Podman's IPAM hands out
  10.88.0.x upwards, far from these.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from netns import outer_namespace

CACHE = Path("/var/cache/stockade-test/vm")
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
MODULES = ("kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
           "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
           "kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "kernel/drivers/virtio/virtio_pci.ko",
           "kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
           "kernel/drivers/net/virtio_net.ko")
INITRD_VERSION = "4"  # bump when INIT changes

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULE_LIST; do insmod /lib/modules/$m; done
ip link set lo up
ip link set eth0 up
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    stockade.ip=*) ip addr add "${arg#stockade.ip=}" dev eth0 ;;
    stockade.gw=*) ip route add default via "${arg#stockade.gw=}" ;;
  esac
done
mkdir -p /www && echo vm > /www/index.html
echo STOCKADE-VM-UP > /dev/ttyS0
stty -F /dev/ttyS1 raw -echo 2>/dev/null
while true; do
  while read -r tok line; do
    sh -c "$line" 2>&1
    echo "@@RC $tok $?@@"
  done < /dev/ttyS1 > /dev/ttyS1
  sleep 0.2
done
"""


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def qemu_available() -> bool:
    return os.geteuid() == 0 and shutil.which(QEMU) is not None and os.path.exists(BUSYBOX)


# -- images --------------------------------------------------------------------

def kernel_version() -> str:
    """The cloud kernel the distribution's meta-package depends on (e.g. 6.1.0-56-cloud-amd64)."""
    out = run("apt-cache", "depends", "linux-image-cloud-amd64").stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-") and line.endswith("-cloud-amd64"):
            return line.split("linux-image-", 1)[1]
    raise RuntimeError(f"cannot find the cloud kernel version in:\n{out}")


def ensure_kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules dir), downloading and unpacking the .deb once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done = sorted(CACHE.glob("root-*/boot/vmlinuz-*"))
    if done:
        vmlinuz = done[-1]
        ver = vmlinuz.name.split("vmlinuz-", 1)[1]
        return vmlinuz, vmlinuz.parent.parent / "lib" / "modules" / ver
    ver = kernel_version()
    debs = list(CACHE.glob(f"linux-image-{ver}_*.deb"))
    if not debs:
        # apt's _apt user cannot write into root's cache dir: a harmless warning.
        # from the namespace the session started in: the test's own has no network
        subprocess.run(["apt-get", "download", f"linux-image-{ver}"], cwd=CACHE, check=True,
                       capture_output=True, timeout=600, preexec_fn=outer_namespace)
        debs = list(CACHE.glob(f"linux-image-{ver}_*.deb"))
    tmp = CACHE / f"root-{ver}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run("dpkg", "-x", str(debs[0]), str(tmp), timeout=300)
    tmp.rename(CACHE / f"root-{ver}")
    return ensure_kernel()


def _cpio_newc(entries) -> bytes:
    """entries: (name, mode, data-or-linktarget). A minimal newc writer."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        if isinstance(data, str):
            data = data.encode()
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
        out.write(hdr.encode() + nameb)
        out.write(b"\0" * (-(110 + len(nameb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def vm_images() -> tuple[str, str]:
    """(kernel path, initramfs path), both cached and world-readable (libvirt's qemu user)."""
    vmlinuz, moddir = ensure_kernel()
    initrd = CACHE / f"initrd-{moddir.name}-v{INITRD_VERSION}.cpio.gz"
    if not initrd.exists():
        names = [Path(m).name for m in MODULES]
        entries = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                "lib/modules", "tmp", "www")]
        entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
        entries.append(("bin/sh", 0o120777, "busybox"))
        entries.append(("init", 0o100755, INIT.replace("MODULE_LIST", " ".join(names))))
        for m in MODULES:
            entries.append((f"lib/modules/{Path(m).name}", 0o100644, (moddir / m).read_bytes()))
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
        tmp.rename(initrd)
    for p in (CACHE, vmlinuz, initrd):
        os.chmod(p, os.stat(p).st_mode | 0o005)
    for parent in vmlinuz.parents:
        if parent == CACHE:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    return str(vmlinuz), str(initrd)


def cmdline(ip: str, gw: str | None = None) -> str:
    args = f"console=ttyS0 quiet panic=-1 stockade.ip={ip}"
    return args + (f" stockade.gw={gw}" if gw else "")


# -- the control channel -----------------------------------------------------------

class Console:
    """Line-oriented shell on the guest's ttyS1 (QEMU unix socket chardev)."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                self.sock = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        # The guest's loop starts a few seconds after boot; ping it until it answers.
        while True:
            try:
                out = self.sh("echo pong", timeout=1.0)
                if out.strip().endswith("pong"):
                    return
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"VM console {self.path} did not answer")

    def sh(self, command: str, timeout: float = 20) -> str:
        """Run ``command`` in the guest; returns its output (stdout+stderr)."""
        out, rc = self.run(command, timeout)
        return out

    def run(self, command: str, timeout: float = 20) -> tuple[str, int]:
        """Each command carries a token its reply repeats, so a late reply to an earlier
        command (one that timed out) is skipped, never taken as this one's."""
        assert self.sock is not None
        self._token = getattr(self, "_token", 0) + 1
        token = b"%d" % self._token
        self.sock.sendall(token + b" " + command.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(b"@@RC ")
            if i >= 0:
                j = self.buf.find(b"@@", i + 5)
                if j >= 0:
                    tok, _, rc = self.buf[i + 5:j].partition(b" ")
                    out = self.buf[:i].decode(errors="replace")
                    self.buf = self.buf[j + 2:].lstrip(b"\r\n")
                    if tok != token:
                        continue  # an earlier command's late reply
                    return out, int(rc)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {command!r}; got {self.buf[-300:]!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError("VM console closed")
            self.buf += data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- plain QEMU VMs --------------------------------------------------------------

class QemuVM:
    """One QEMU TCG VM on its own tap. start()/stop() may be repeated (a restart gets a
    new tap, hence a new ifindex; pass tap= to stop/start to rename it)."""

    def __init__(self, name: str, *, tap: str, mac: str, ip: str, bridge: str | None,
                 tap_mac: str | None = None, run_dir: str | None = None):
        self.name, self.tap, self.mac, self.ip, self.bridge = name, tap, mac, ip, bridge
        self.tap_mac = tap_mac
        self.dir = Path(run_dir or f"/run/stockade-test-vm/{name}-{os.getpid()}")
        self.proc: subprocess.Popen | None = None
        self.console: Console | None = None
        self.tap_ifindex: int | None = None
        self.tap_created: float | None = None  # time.monotonic() of the last `ip tuntap add`
        self.boot_time: float | None = None

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]

    def _make_tap(self) -> None:
        run("ip", "tuntap", "add", self.tap, "mode", "tap")
        self.tap_created = time.monotonic()
        if self.tap_mac:
            run("ip", "link", "set", self.tap, "address", self.tap_mac)
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.tap}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        if self.bridge:
            run("ip", "link", "set", self.tap, "master", self.bridge)
        run("ip", "link", "set", self.tap, "up")
        self.tap_ifindex = socket.if_nametoindex(self.tap)

    def start(self, tap: str | None = None, wait: bool = True) -> "QemuVM":
        if tap:
            self.tap = tap
        kernel, initrd = vm_images()
        self.dir.mkdir(parents=True, exist_ok=True)
        ctl = self.dir / "ctl.sock"
        ctl.unlink(missing_ok=True)
        self._make_tap()
        t0 = time.monotonic()
        log = open(self.dir / "qemu.log", "ab")
        self.proc = subprocess.Popen([
            QEMU, "-accel", "tcg", "-m", "192", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", cmdline(self.ip),
            "-serial", f"file:{self.dir / 'console.log'}",
            "-serial", f"unix:{ctl},server=on,wait=off",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_console(str(ctl))
            self.boot_time = time.monotonic() - t0
        return self

    def wait_console(self, path: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no console socket: {self.log()}")
            time.sleep(0.05)
        self.console = Console(path)
        try:
            self.console.connect(timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.log()}") from None

    def log(self) -> str:
        out = []
        for f in ("qemu.log", "console.log"):
            try:
                out.append((self.dir / f).read_text(errors="replace")[-2000:])
            except OSError:
                pass
        return "\n".join(out)

    def sh(self, command: str, timeout: float = 20) -> str:
        assert self.console is not None, "VM not started"
        return self.console.sh(command, timeout)

    def run(self, command: str, timeout: float = 20) -> tuple[str, int]:
        assert self.console is not None, "VM not started"
        return self.console.run(command, timeout)

    def stop(self) -> None:
        """Kill QEMU (by PID) and delete the tap; safe to call twice."""
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        run("ip", "link", "del", self.tap, check=False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "QemuVM":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def host_mac(guest_mac: str) -> str:
    """libvirt's convention for the host side of a tap: the guest MAC with 0xfe first."""
    return "fe:" + guest_mac.lower().split(":", 1)[1]


def link_info(ifname: str) -> dict | None:
    r = run("ip", "-j", "link", "show", ifname, check=False)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None


# -- libvirt -------------------------------------------------------------------------

LIBVIRT_URI = "qemu:///system"
LIBVIRT_SOCK = "/var/run/libvirt/libvirt-sock"


def libvirt_available() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return qemu_available() and shutil.which("libvirtd") is not None and shutil.which("virsh") is not None


def _daemon_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start_libvirtd() -> list[int]:
    """Start virtlogd and libvirtd without systemd unless they run; returns the PIDs this
    call started (stop them with stop_pids). Creates what the daemon needs: /var/log/libvirt,
    the kvm group and the libvirt-qemu system user."""
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    # qemu.conf runs guests as user and group libvirt-qemu (in kvm); Debian's
    # libvirt-daemon-system would create them, plain libvirt-daemon does not.
    for group in ("kvm", "libvirt-qemu"):
        if run("getent", "group", group, check=False).returncode != 0:
            run("groupadd", "--system", group)
    if run("getent", "passwd", "libvirt-qemu", check=False).returncode != 0:
        run("useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt",
            "--shell", "/usr/sbin/nologin", "-g", "libvirt-qemu", "-G", "kvm", "libvirt-qemu")
    # libvirtd makes the guests' taps in its own network namespace: the test's agent
    # and bridge are in the test's (tests/conftest.py), so a libvirtd running elsewhere
    # (the host's, under systemd) cannot serve the test
    pid = _daemon_pid("/run/libvirtd.pid")
    if pid is not None and os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/thread-self/ns/net"):
        raise RuntimeError(f"libvirtd (PID {pid}) runs in another network namespace than the "
                           "test's; stop it, the test starts its own")
    started: list[int] = []
    try:
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            if _daemon_pid(pidfile) is None:
                run(daemon, "-d", timeout=30)
                deadline = time.monotonic() + 15
                while _daemon_pid(pidfile) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                pid = _daemon_pid(pidfile)
                if pid is None:
                    raise RuntimeError(f"{daemon} -d did not start")
                started.append(pid)
        deadline = time.monotonic() + 20
        while run("virsh", "-c", LIBVIRT_URI, "version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd does not answer (run it in the foreground to see why)")
            time.sleep(0.1)
    except BaseException:
        stop_pids(started)
        raise
    return started


def stop_pids(pids: list[int]) -> None:
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


class PrivateLibvirtd:
    """A libvirtd of the test's own, unprivileged (user nobody, everything under its own
    directory in /run), so that a test may hang (SIGSTOP), stop and restart it without
    touching the host's libvirtd or its domains. It serves libvirt's test driver from
    ``node.xml``: ``uri`` names that file, and every new connection reads it again, so
    what the file says when a client (re)connects is what that client lists.

        with PrivateLibvirtd("skd") as lv:
            lv.write_domains([("skd-a", uuid, mac, tap, {"app": "a"}, "10.1.0.1")])
            AgentProcess(libvirt_uri=lv.uri)...
            lv.pause(); lv.resume(); lv.stop(); lv.start()

    The daemon is run in the foreground and stopped by its PID."""

    def __init__(self, tag: str):
        self.dir = Path(f"/run/stockade-test-{tag}-{os.getpid()}")
        self.socket = self.dir / "libvirt-sock"
        self.node = self.dir / "node.xml"
        self.uri = f"test+unix://{self.node}?socket={self.socket}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrivateLibvirtd":
        self.dir.mkdir(mode=0o755)
        os.chown(self.dir, 65534, 65534)
        (self.dir / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.dir}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n')
        if not self.node.exists():
            self.write_domains([])
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def write_domains(self, domains: list[tuple[str, str, str, str, dict[str, str], str]]) -> None:
        """The node file: running domains as (name, uuid, guest MAC, host tap, labels, ip)."""
        parts = []
        for name, uuid, mac, tap, labels, ip in domains:
            meta = "".join(f'<label key="{k}">{v}</label>' for k, v in labels.items())
            parts.append(
                f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>"
                f"<os><type>hvm</type></os><metadata><stockade:endpoint "
                f'xmlns:stockade="https://stockade.dev/xmlns/endpoint/1">{meta}<ip>{ip}</ip>'
                f"</stockade:endpoint></metadata><devices><interface type='ethernet'>"
                f"<mac address='{mac}'/><target dev='{tap}'/></interface></devices></domain>")
        tmp = self.node.with_suffix(".tmp")
        tmp.write_text("<node>" + "".join(parts) + "</node>\n")
        os.chmod(tmp, 0o644)
        tmp.replace(self.node)

    def start(self, timeout: float = 20) -> "PrivateLibvirtd":
        self.socket.unlink(missing_ok=True)
        home = str(self.dir)
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": home, "XDG_RUNTIME_DIR": home,
               "XDG_CONFIG_HOME": f"{home}/config", "XDG_CACHE_HOME": f"{home}/cache"}
        log = open(self.dir / "libvirtd.log", "ab")
        self.proc = subprocess.Popen(["/usr/sbin/libvirtd", "-f", str(self.dir / "libvirtd.conf")],
                                     user=65534, group=65534, extra_groups=[], env=env, cwd=home,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while run("virsh", "-c", self.uri, "list", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the private libvirtd did not answer:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        try:
            return (self.dir / "libvirtd.log").read_text()[-3000:]
        except OSError:
            return ""

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)   # a stopped process would not see SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <metadata>
    <stockade:endpoint xmlns:stockade="https://stockade.dev/xmlns/endpoint/1">
{meta}
    </stockade:endpoint>
  </metadata>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='null'><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{ctl}'/><target port='1'/></serial>
  </devices>
</domain>
"""


class LibvirtVM:
    """A libvirt-defined TCG domain with direct kernel boot on ``bridge``; labels and IPs
    in its Stockade metadata. close() destroys and undefines it."""

    def __init__(self, name: str, *, mac: str, ip: str, bridge: str, labels: dict[str, str]):
        import libvirt
        self.name, self.mac, self.ip, self.bridge, self.labels = name, mac, ip, bridge, labels
        self.dir = Path(f"/run/stockade-test-vm/{name}")
        self.conn = libvirt.open(LIBVIRT_URI)
        self.dom = None
        self.console: Console | None = None

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]

    def define(self) -> "LibvirtVM":
        kernel, initrd = vm_images()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)
        meta = "\n".join([f'      <label key="{k}">{v}</label>' for k, v in self.labels.items()]
                         + [f"      <ip>{self.addr}</ip>"])
        xml = DOMAIN_XML.format(name=self.name, kernel=kernel, initrd=initrd,
                                cmdline=cmdline(self.ip), meta=meta, bridge=self.bridge,
                                mac=self.mac, ctl=self.dir / "ctl.sock")
        self.dom = self.conn.defineXML(xml)
        return self

    def start(self, wait: bool = True) -> "LibvirtVM":
        (self.dir / "ctl.sock").unlink(missing_ok=True)
        self.dom.create()
        if wait:
            self.connect_console()
        return self

    def connect_console(self, timeout: float = 90) -> None:
        self.console = Console(str(self.dir / "ctl.sock"))
        self.console.connect(timeout)

    def tap(self) -> str | None:
        import xml.etree.ElementTree as ET
        t = ET.fromstring(self.dom.XMLDesc(0)).find("./devices/interface/target")
        return t.get("dev") if t is not None else None

    def sh(self, command: str, timeout: float = 20) -> str:
        assert self.console is not None
        return self.console.sh(command, timeout)

    def run(self, command: str, timeout: float = 20) -> tuple[str, int]:
        assert self.console is not None
        return self.console.run(command, timeout)

    def destroy(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.dom is not None and self.dom.isActive():
            self.dom.destroy()

    def close(self) -> None:
        try:
            self.destroy()
        finally:
            if self.dom is not None:
                try:
                    self.dom.undefine()
                except Exception:
                    pass
                self.dom = None
            self.conn.close()
            shutil.rmtree(self.dir, ignore_errors=True)


# -- namespace workloads on an existing bridge -----------------------------------------

class BridgeNamespace:
    """A network namespace with one veth on ``bridge`` (e.g. Podman's), an address and an
    optional busybox httpd on port 8080. close() kills the httpd (by PID) and deletes the
    veth and the namespace."""

    def __init__(self, name: str, bridge: str, addr: str, *, httpd: bool = True):
        self.ns, self.host_if, self.bridge, self.addr = name, f"{name}h", bridge, addr
        assert len(self.host_if) <= 15, self.host_if
        self.httpd_proc: subprocess.Popen | None = None
        self.want_httpd = httpd
        self.www = Path(f"/run/stockade-test-vm/{name}-www")

    @property
    def ip(self) -> str:
        return self.addr.split("/")[0]

    def __enter__(self) -> "BridgeNamespace":
        try:
            run("ip", "netns", "add", self.ns)
            run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
                "netns", self.ns)
            try:
                with open(f"/proc/sys/net/ipv6/conf/{self.host_if}/disable_ipv6", "w") as f:
                    f.write("1")
            except OSError:
                pass
            run("ip", "link", "set", self.host_if, "master", self.bridge, "up")
            run("ip", "-n", self.ns, "link", "set", "lo", "up")
            run("ip", "-n", self.ns, "addr", "add", self.addr, "dev", "eth0")
            run("ip", "-n", self.ns, "link", "set", "eth0", "up")
            if self.want_httpd:
                self.www.mkdir(parents=True, exist_ok=True)
                (self.www / "index.html").write_text(f"{self.ns}\n")
                self.httpd_proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns, BUSYBOX, "httpd", "-f", "-p", "8080",
                     "-h", str(self.www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, ip: str, port: int = 8080, timeout: float = 1) -> str | None:
        """HTTP GET from inside the namespace; the body's first line, or None."""
        r = run("ip", "netns", "exec", self.ns, BUSYBOX, "sh", "-c",
                f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {BUSYBOX} nc -w {int(timeout)} {ip} {port}",
                check=False, timeout=timeout + 10)
        return _body(r.stdout) if r.returncode == 0 else None

    def close(self) -> None:
        if self.httpd_proc is not None and self.httpd_proc.poll() is None:
            self.httpd_proc.kill()
            self.httpd_proc.wait(timeout=10)
        run("ip", "link", "del", self.host_if, check=False)
        run("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.www, ignore_errors=True)


def _body(text: str) -> str | None:
    _, sep, body = text.replace("\r\n", "\n").partition("\n\n")
    return body.strip() or None if sep else None


def vm_get(vm, ip: str, port: int = 8080, wait: int = 1) -> str | None:
    """HTTP GET from inside a VM (busybox nc, ``wait`` s connect timeout); the body, or None."""
    out, rc = vm.run(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {wait} {ip} {port}", timeout=15)
    return _body(out) if rc == 0 else None


def packets(metrics_text: str, reason: str) -> int:
    """Sum of stockade_packets{reason=...} in a Prometheus text page."""
    total = 0
    for line in metrics_text.splitlines():
        if line.startswith("stockade_packets") and f'reason="{reason}"' in line:
            try:
                total += int(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return total


class LinkWatch:
    """Timestamps (time.monotonic) when links whose name starts with ``prefix`` appear,
    from netlink events in a thread. ``appeared(name)`` -> time or None."""

    def __init__(self, prefix: str):
        import threading

        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        self.prefix, self.seen = prefix, {}
        self._ipr = IPRoute()
        self._ipr.bind(groups=RTMGRP_LINK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._ipr], [], [], 0.2)
                if not ready:
                    continue
                msgs = self._ipr.get()
            except (OSError, ValueError):
                return
            now = time.monotonic()
            for m in msgs:
                name = m.get_attr("IFLA_IFNAME") or ""
                if m.get("event") == "RTM_NEWLINK" and name.startswith(self.prefix):
                    self.seen.setdefault((name, m["index"]), now)

    def appeared(self, name: str, ifindex: int) -> float | None:
        return self.seen.get((name, ifindex))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._ipr.close()
