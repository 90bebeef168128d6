#!/usr/bin/env python3
"""Build the tiny busybox image used by the tests and the demo, once.

    python3 scripts/bbimage.py [--image localhost/stockade-bb:latest]

Debian's busybox-static (/bin/busybox, no shared libraries) becomes a rootfs tarball
that ``podman import`` turns into an image; there is no registry on these machines.
Prints "exists" or "built". Podman runs with CONTAINERS_CONF from the environment
(tests/data/containers.conf: runc, cgroupfs, no ulimits). tests/podman.py imports this.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

IMAGE = "localhost/stockade-bb:latest"
BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh", "nc", "httpd", "wget", "ping", "ping6", "ip", "ifconfig", "route", "sleep",
    "cat", "echo", "ls", "ps", "kill", "true", "false", "hostname", "mkdir", "env",
    "grep", "timeout", "nslookup", "udhcpc", "seq", "printf", "test", "[",
)
GLOBAL_ARGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *GLOBAL_ARGS, *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc


def write_rootfs(tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "var/www", "root"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n"),
                           ("var/www/index.html", "stockade\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def ensure_image(image: str = IMAGE, podman=_podman) -> bool:
    """Build ``image`` unless it exists; True if it was built. ``podman(*args, check=)``
    runs podman (tests pass their own, which sets the test config)."""
    if podman("image", "exists", image, check=False).returncode == 0:
        return False
    with tempfile.TemporaryDirectory(prefix="stockade-bb-") as tmp:
        tar_path = Path(tmp) / "rootfs.tar"
        write_rootfs(tar_path)
        podman("import", "--change", 'CMD ["/bin/sh"]', str(tar_path), image)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=IMAGE)
    args = ap.parse_args()
    if not os.path.exists(BUSYBOX):
        print(f"{BUSYBOX} is missing: apt-get install busybox-static (make setup)", file=sys.stderr)
        return 1
    print("built" if ensure_image(args.image) else "exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
