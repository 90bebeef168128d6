"""A Debian 12 guest image for the real host test, built once and cached.

    python3 -m tests.host.image            # build unless cached; prints the paths and times

Cache: /var/cache/stockade-host (CACHE below):
  debs/                       every .deb debootstrap and apt fetched (seeded from the
                              host's /var/cache/apt/archives); later builds reuse them
  wheels/                     the agent's dependency wheels (the guest reaches no registry)
  image-v<N>/                 rootfs.raw (ext4 made by mkfs.ext4 -d, no partition table,
                              no bootloader), vmlinuz, initrd.img, build.json (times)

The root filesystem: debootstrap --variant=minbase bookworm, then one `apt-get install
--no-install-recommends` in the chroot of what the guest needs: systemd as PID 1,
openssh-server, Podman with runc, python3 (+venv) and python3-bpfcc, nftables, Debian's
cloud kernel linux-image-<ver>-cloud-amd64 and its matching linux-headers (bcc compiles
against /lib/modules/<ver>/build). Documentation and locales are not unpacked and dpkg
skips fsync (force-unsafe-io): the image is rebuilt, never repaired.

Baked-in configuration: eth0 (any en*/eth*) gets GUEST_IP by systemd-networkd, no
default route (the guest reaches only the test's bridge); root logs in over SSH with the
key given on the kernel command line (stockade.sshkey=<base64 of the public key>, written
by stockade-sshkey.service before sshd starts); Podman runs with runc;
podman-restart.service is enabled (it starts `--restart always` containers at boot).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("STOCKADE_HOST_CACHE", "/var/cache/stockade-host"))
IMAGE_VERSION = "4"  # bump when the package list or the baked-in files change
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
IMAGE_SIZE = "6G"  # sparse; about 1.5 GB is used

GUEST_IP = "10.213.7.2"
HOST_IP = "10.213.7.1"
PREFIX = 24

PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "iproute2",
    "iputils-ping", "procps", "kmod", "nftables", "iptables",
    "podman", "runc", "conmon", "containernetworking-plugins",
    "python3", "python3-venv", "python3-bpfcc",
    # what the agent role's apt task installs (skipped for this guest), and what
    # ansible.builtin.pip needs on the host
    "python3-yaml", "ca-certificates", "python3-packaging", "python3-setuptools", "haproxy",
    "initramfs-tools",
]

SOURCES = f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

DPKG_EXCLUDES = """\
force-unsafe-io
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""

FILES = {
    "etc/hostname": "stockade-guest\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 stockade-guest\n",
    "etc/fstab": "/dev/vda / ext4 rw,relatime 0 1\n",
    "etc/systemd/network/10-test.network": f"""\
[Match]
Name=en* eth*

[Network]
Address={GUEST_IP}/{PREFIX}
LinkLocalAddressing=no
IPv6AcceptRA=no
""",
    "etc/containers/containers.conf": """\
[engine]
runtime = "runc"
""",
    "usr/local/sbin/stockade-sshkey": """\
#!/bin/sh
# The test's public key comes on the kernel command line: stockade.sshkey=<base64>.
set -e
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    stockade.sshkey=*)
      install -d -m 0700 /root/.ssh
      echo "${arg#stockade.sshkey=}" | base64 -d > /root/.ssh/authorized_keys
      chmod 0600 /root/.ssh/authorized_keys ;;
  esac
done
""",
    "etc/systemd/system/stockade-sshkey.service": """\
[Unit]
Description=Root's SSH key from the kernel command line (the host test)
Before=ssh.service
DefaultDependencies=no
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/stockade-sshkey
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
""",
    "etc/ssh/sshd_config.d/stockade-test.conf": """\
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
""",
    "etc/initramfs-tools/conf.d/stockade": "MODULES=most\nCOMPRESS=gzip\n",
}


def log(msg: str) -> None:
    print(f"[host-image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*argv: str, timeout: float = 1800, env: dict | None = None, **kw) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def image_dir() -> Path:
    return CACHE / f"image-v{IMAGE_VERSION}"


def cached() -> dict | None:
    meta = image_dir() / "build.json"
    if meta.exists():
        return json.loads(meta.read_text())
    return None


def seed_debs(debs: Path) -> int:
    """Hard-link (or copy) the host's downloaded packages into the cache: apt and
    debootstrap take a .deb already there instead of fetching it."""
    debs.mkdir(parents=True, exist_ok=True)
    n = 0
    for deb in Path("/var/cache/apt/archives").glob("*.deb"):
        dst = debs / deb.name
        if dst.exists():
            continue
        try:
            os.link(deb, dst)
        except OSError:
            shutil.copy2(deb, dst)
        n += 1
    return n


class Chroot:
    """/proc, /sys, /dev and the package cache mounted into the root while it is built."""

    def __init__(self, root: Path, debs: Path):
        self.root, self.debs = root, debs
        self.mounts: list[Path] = []

    def __enter__(self) -> "Chroot":
        for src, dst, args in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--bind"]), ("/dev/pts", "dev/pts", ["--bind"]),
                               (str(self.debs), "var/cache/apt/archives", ["--bind"])):
            target = self.root / dst
            target.mkdir(parents=True, exist_ok=True)
            sh("mount", *args, src, str(target))
            self.mounts.append(target)
        return self

    def run(self, *argv: str, timeout: float = 1800) -> None:
        sh("chroot", str(self.root), *argv, timeout=timeout,
           env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def __exit__(self, *exc) -> None:
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def kernel_version(root: Path) -> str:
    vers = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(vers) != 1:
        raise RuntimeError(f"expected one kernel in the image, found {vers}")
    return vers[0]


def build_rootfs(root: Path, debs: Path, times: dict) -> str:
    t = time.monotonic()
    sh("debootstrap", "--variant=minbase", f"--cache-dir={debs}", "--components=main",
       SUITE, str(root), MIRROR)
    times["debootstrap_s"] = round(time.monotonic() - t, 1)
    log(f"debootstrap done in {times['debootstrap_s']} s")

    (root / "etc/dpkg/dpkg.cfg.d/stockade-image").write_text(DPKG_EXCLUDES)
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
    (root / "etc/apt/apt.conf.d/90stockade-image").write_text(
        'Acquire::Languages "none";\nAPT::Install-Recommends "false";\n'
        'Binary::apt::APT::Keep-Downloaded-Packages "true";\n')
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    os.chmod(root / "usr/sbin/policy-rc.d", 0o755)
    for rel, text in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    os.chmod(root / "usr/local/sbin/stockade-sshkey", 0o755)

    t = time.monotonic()
    with Chroot(root, debs) as ch:
        ch.run("apt-get", "update", "-qq", timeout=600)
        # The meta-packages name the current cloud kernel; its headers match it exactly.
        ch.run("apt-get", "install", "-y", "-qq", *PACKAGES,
               "linux-image-cloud-amd64", "linux-headers-cloud-amd64", timeout=2400)
        ch.run("systemctl", "enable", "systemd-networkd.service", "stockade-sshkey.service",
               "podman-restart.service", "podman.socket", "ssh.service")
        ch.run("systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer",
               "e2scrub_all.timer", "fstrim.timer", "systemd-timesyncd.service")
    times["apt_install_s"] = round(time.monotonic() - t, 1)
    log(f"packages installed in {times['apt_install_s']} s")
    (root / "usr/sbin/policy-rc.d").unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    (root / "etc/machine-id").write_text("")  # systemd makes one at first boot
    # root's password is locked; SSH only, with the test's key
    return kernel_version(root)


def build_wheels(wheels: Path, project: Path, python: str) -> None:
    """The project's dependency wheels (not the project: the role builds that)."""
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = wheels.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sh(python, "-m", "pip", "wheel", "-q", "-w", str(tmp), str(project), timeout=900)
    for whl in tmp.glob("*.whl"):
        if not whl.name.startswith("stockade-"):
            shutil.move(str(whl), wheels / whl.name)
    shutil.rmtree(tmp, ignore_errors=True)


def build(project: Path | None = None, python: str | None = None) -> dict:
    """Build the image unless cached; returns build.json's contents."""
    meta = cached()
    if meta:
        return meta
    project = project or Path(__file__).resolve().parents[2]
    python = python or sys.executable
    t0 = time.monotonic()
    times: dict = {}
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    seeded = seed_debs(debs) if os.environ.get("STOCKADE_HOST_SEED", "1") == "1" else 0
    log(f"seeded {seeded} packages from /var/cache/apt/archives")

    t = time.monotonic()
    build_wheels(CACHE / "wheels", project, python)
    times["wheels_s"] = round(time.monotonic() - t, 1)

    out = image_dir()
    work = CACHE / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "root"
    try:
        kver = build_rootfs(root, debs, times)
        wheel_dst = root / "opt/stockade-wheels"
        wheel_dst.mkdir(parents=True)
        for whl in (CACHE / "wheels").glob("*.whl"):
            shutil.copy2(whl, wheel_dst / whl.name)
        shutil.copy2(root / f"boot/vmlinuz-{kver}", work / "vmlinuz")
        shutil.copy2(root / f"boot/initrd.img-{kver}", work / "initrd.img")
        t = time.monotonic()
        sh("mkfs.ext4", "-q", "-F", "-L", "stockade-root", "-E", "root_owner=0:0",
           "-d", str(root), str(work / "rootfs.raw"), IMAGE_SIZE, timeout=900)
        times["mkfs_s"] = round(time.monotonic() - t, 1)
        shutil.rmtree(root)
        times["total_s"] = round(time.monotonic() - t0, 1)
        meta = {"kernel": kver, "times": times, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime())}
        (work / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        for old in CACHE.glob("image-v*"):  # images of other versions are never booted again
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            subprocess.run(["umount", "-R", "-l", str(root)], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    log(f"image built in {meta['times']['total_s']} s: {out}")
    return meta


def paths() -> dict[str, Path]:
    d = image_dir()
    return {"rootfs": d / "rootfs.raw", "kernel": d / "vmlinuz", "initrd": d / "initrd.img",
            "wheels": CACHE / "wheels"}


if __name__ == "__main__":
    print(json.dumps(build(), indent=1))
