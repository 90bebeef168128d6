"""Stockade on a real host: a Debian 12 guest booted under QEMU with systemd as PID 1,
installed, rebooted, upgraded and uninstalled over SSH by ansible-playbook.

The guest runs Debian's cloud kernel 6.1, which has no tcx: this test exercises the agent's
tc attach path (clsact + tc BPF filters), not the tcx links of newer kernels.

The steps run in file order on one guest (session fixture ``guest``); each checks traffic
from inside the guest between Podman containers (a busybox image imported into the guest,
scripts/bbimage.py). Addresses: the guest 10.213.7.2 on the test's bridge; containers on
Podman's default network with fixed addresses (below). Nothing leaves the guest.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.root, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bbimage import write_rootfs  # noqa: E402  (the busybox image of the other tests)

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
SRV_IP, CLI_IP, BAD_IP, STREAM_IP = "10.88.0.50", "10.88.0.51", "10.88.0.52", "10.88.0.53"
IMAGE = "localhost/stockade-bb:latest"
LOGS = "/var/lib/hostt"  # in the guest: each container's log directory (a volume)

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "hostt-srv"},
    "spec": {
        "description": "Only the client reaches the server (HTTP and the stream port).",
        "endpointSelector": {"matchLabels": {"app": "hostt-srv"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "hostt-client"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                                            {"port": "9000", "protocol": "TCP"}]}]}],
    },
}

# A prober appends "<unix time> open|closed" for each attempt on the server's HTTP port.
PROBE = ("i=0; while :; do if wget -q -T 1 -O /dev/null http://%s/; then r=open; else r=closed; "
         "fi; echo \"$(busybox date +%%s) $r\" >> /log/probe; busybox sleep 0.2; done")


# -- helpers ---------------------------------------------------------------------

def playbook(guest, workdir: Path, name: str, extra: dict | None = None) -> dict:
    """Run ansible-playbook over SSH; returns the guest's PLAY RECAP counters and the time."""
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env.update({
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_LIBRARY": str(ROOT / "modules"),
        "ANSIBLE_MODULE_UTILS": str(ROOT / "module_utils"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(workdir / "cp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    })
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i",
            str(workdir / "inventory" / "hosts.yml"), str(PLAYBOOKS / name)]
    extra_file = None
    if extra:
        extra_file = workdir / f"extra-{name}.yml"
        extra_file.write_text(yaml.safe_dump(extra))
        argv += ["-e", f"@{extra_file}"]
    t = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)
    took = round(time.monotonic() - t, 1)
    (workdir / f"ansible-{name}-{int(time.time())}.log").write_text(proc.stdout + proc.stderr)
    m = re.search(r"^guest\s*:\s*(.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        raise AssertionError(f"ansible-playbook {name} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    recap = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
    recap["seconds"] = took
    recap["output"] = proc.stdout  # type: ignore[assignment]
    return recap


def changed_tasks(output: str) -> list[str]:
    """The names of the tasks that reported changed (for a readable failure)."""
    names, current = [], None
    for line in output.splitlines():
        if line.startswith("TASK ["):
            current = line[6:].split("]")[0]
        elif line.startswith("changed:") and current:
            names.append(current)
    return names


def write_inventory(guest, workdir: Path) -> None:
    inv = workdir / "inventory"
    (inv / "policies").mkdir(parents=True, exist_ok=True)
    (inv / "policies" / "hostt.yaml").write_text(yaml.safe_dump(POLICY, sort_keys=False))
    guest.inventory(
        inv / "hosts.yml",
        stockade_agent_install_packages=False,  # everything is baked into the image
        stockade_agent_project_dir=str(ROOT),
        stockade_agent_settings={"docker_socket": None},
        stockade_policies=["policies/*.yaml"],
    )


def container(guest, name: str, ip: str, app: str, cmd: str, restart: bool = True) -> None:
    guest.ssh(f"mkdir -p {LOGS}/{name}")
    guest.ssh(f"podman rm -f {name} >/dev/null 2>&1 || true")
    guest.ssh(" ".join([
        "podman run -d --name", name, "--ip", ip, "--label", f"app={app}",
        "--restart always" if restart else "", "-v", f"{LOGS}/{name}:/log",
        IMAGE, "sh -c", repr(cmd)]))


def probes(guest, name: str) -> list[tuple[int, str]]:
    out = guest.ssh(f"cat {LOGS}/{name}/probe 2>/dev/null || true")
    return [(int(t), r) for t, r in (line.split() for line in out.splitlines() if line.strip())]


def reach(guest, name: str, url: str, tries: int = 1) -> bool:
    for _ in range(tries):
        proc = guest.ssh_run(f"podman exec {name} wget -q -T 2 -O /dev/null {url}", timeout=60)
        if proc.returncode == 0:
            return True
    return False


def wait_until(fn, timeout: float, what: str, step: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


# -- the steps -------------------------------------------------------------------

def test_guest_is_a_real_host(guest, figures):
    """systemd is PID 1, the cloud kernel 6.1 with matching headers, no tcx, no registry."""
    out = guest.ssh("readlink /proc/1/exe; uname -r; systemctl is-system-running --wait || true;"
                    " test -e /lib/modules/$(uname -r)/build/include/generated/autoconf.h"
                    " && echo headers; ip route")
    lines = out.splitlines()
    assert lines[0] == "/usr/lib/systemd/systemd", out
    assert lines[1] == guest.kernel_version and lines[1].startswith("6.1."), out
    assert lines[2] in ("running", "degraded"), guest.ssh("systemctl --failed --no-legend")
    assert "headers" in lines, out
    assert "default" not in out, "the guest must have no route beyond the test's bridge"
    figures["guest_systemd"] = lines[2]


def test_install_over_ssh(guest, workdir, figures):
    """ansible-playbook over SSH installs the agent (offline) and the policy; two Podman
    containers are allowed and denied as the policy says, checked inside the guest."""
    tar = workdir / "bb.tar"
    write_rootfs(tar)
    guest.put(tar, "/root/bb.tar")
    guest.ssh(f"podman import --change 'CMD [\"/bin/sh\"]' /root/bb.tar {IMAGE} >/dev/null"
              " && rm /root/bb.tar")
    # The guest reaches no package index: pip takes the wheels baked into the image.
    guest.ssh("printf '[global]\\nno-index = true\\nfind-links = /opt/stockade-wheels\\n'"
              " > /etc/pip.conf")
    write_inventory(guest, workdir)
    recap = playbook(guest, workdir, "install.yml")
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    figures["install_over_ssh_s"] = recap["seconds"]
    assert guest.ssh("systemctl is-active stockade-agent").strip() == "active"

    container(guest, "hostt-srv", SRV_IP, "hostt-srv", "httpd -f -p 80 -h /var/www")
    container(guest, "hostt-cli", CLI_IP, "hostt-client", PROBE % SRV_IP)
    container(guest, "hostt-bad", BAD_IP, "hostt-intruder", PROBE % SRV_IP)
    assert wait_until(lambda: reach(guest, "hostt-cli", f"http://{SRV_IP}/"), 120,
                      "the allowed client to reach the server")
    assert not reach(guest, "hostt-bad", f"http://{SRV_IP}/", tries=3), "denied peer got in"
    status = guest.ssh("/opt/stockade/venv/bin/stockade status -o json")
    assert '"hostt-srv"' in status or "hostt-srv" in status, status


def test_second_run_changes_nothing(guest, workdir, figures):
    recap = playbook(guest, workdir, "install.yml")
    figures["second_run_s"] = recap["seconds"]
    assert recap["changed"] == 0, changed_tasks(recap["output"])  # type: ignore[arg-type]


def test_reboot_enforces_before_containers_restart(guest, figures):
    """After a reboot the restored policy is in force before Podman restarts the
    `--restart always` containers: the denied prober, itself restarted from boot on,
    never reaches the server while the allowed one does."""
    guest.ssh(f"rm -f {LOGS}/hostt-cli/probe {LOGS}/hostt-bad/probe")
    figures["reboot_to_ssh_s"] = guest.reboot()
    boot = int(guest.ssh("date +%s").strip()) - int(float(
        guest.ssh("cut -d' ' -f1 /proc/uptime").strip()))
    wait_until(lambda: any(r == "open" for _, r in probes(guest, "hostt-cli")), 300,
               "the allowed client to reach the server after the reboot")
    time.sleep(5)
    bad = probes(guest, "hostt-bad")
    assert bad, "the denied prober did not run after the reboot"
    opened = [(t - boot, r) for t, r in bad if r == "open"]
    assert not opened, f"the denied peer reached the server after boot: {opened[:5]}"
    first_ok = min(t for t, r in probes(guest, "hostt-cli") if r == "open") - boot
    figures["reboot_denied_probes"] = len(bad)
    figures["reboot_first_allowed_after_boot_s"] = first_ok
    order = guest.ssh(
        "systemctl show -p ActiveEnterTimestampMonotonic --value stockade-agent;"
        " systemctl show -p ExecMainStartTimestampMonotonic --value podman-restart")
    agent_us, restart_us = (int(x) for x in order.split())
    figures["reboot_agent_active_s"] = round(agent_us / 1e6, 1)
    figures["reboot_podman_restart_s"] = round(restart_us / 1e6, 1)
    assert 0 < agent_us < restart_us, "the agent must be up before podman-restart starts"


def test_uninstall_leaves_nothing(guest, workdir, figures):
    recap = playbook(guest, workdir, "uninstall.yml")
    assert recap["failed"] == 0
    figures["uninstall_s"] = recap["seconds"]
    left = guest.ssh(
        "ls -d /etc/systemd/system/stockade* /lib/systemd/system/stockade* /etc/stockade"
        " /opt/stockade /var/lib/stockade /run/stockade /var/log/stockade /sys/fs/bpf/stockade"
        " /usr/local/sbin/stockade* 2>/dev/null; getent passwd stockade-webui;"
        " systemctl list-units --all --no-legend 'stockade*';"
        " for l in $(ls /sys/class/net); do tc filter show dev $l ingress 2>/dev/null;"
        " tc filter show dev $l egress 2>/dev/null; done | grep -i stockade;"
        " nft list tables 2>/dev/null | grep -i stockade; true")
    assert left.strip() == "", f"left behind after uninstall:\n{left}"
