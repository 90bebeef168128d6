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

import json
import os
import re
import shutil
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

from . import image  # noqa: E402
from .conftest import FIGURES  # noqa: E402

UPGRADE_MARK = "hosttest-upgrade"
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
# (busybox's own `wget -T` segfaults in Debian 12's busybox-static 1.35: `timeout` instead.)
PROBE = ("i=0; while :; do if timeout 1 wget -q -O /dev/null http://%s/; then r=open; else r=closed; "
         "fi; echo \"$(busybox date +%%s) $r\" >> /log/probe; busybox sleep 0.2; done")


# The server: HTTP on 80, and one long-lived stream on 9000 written to its log directory.
# busybox nc half-closes the connection when its stdin ends (the container's is
# /dev/null), which ends the client's nc: its stdin is a pipe that never ends.
SERVER = "httpd -p 80 -h /var/www; busybox sleep 2147483647 | nc -l -p 9000 > /log/stream"
# The stream's client: a counter line every 50 ms over one TCP connection; if that
# connection ever breaks, nc exits and the exit is recorded.
# It starts once the server answers: a new container is dropped until the agent has it.
STREAM = ("until timeout 1 wget -q -O /dev/null http://%s/; do busybox sleep 0.2; done; "
          "i=0; while :; do i=$((i+1)); echo $i; busybox sleep 0.05; done | nc %s 9000; "
          "echo \"exit $?\" > /log/exit")


# -- helpers ---------------------------------------------------------------------

def ansible_env(workdir: Path) -> dict:
    """The controller's environment: the collection as installed by ansible-galaxy (not
    the checkout), SSH multiplexing under the work directory, no SSH agent."""
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    cfg = workdir / "ansible.cfg"
    cfg.write_text(f"""[defaults]
collections_path = {workdir / "collections"}
interpreter_python = auto_silent
host_key_checking = False
retry_files_enabled = False
local_tmp = {workdir / "ansible-tmp"}
nocolor = True
callback_plugins = {Path(__file__).parent / "callback_plugins"}
callbacks_enabled = task_times

[connection]
pipelining = True

[ssh_connection]
control_path_dir = {workdir / "cp"}
""")
    env.update({"ANSIBLE_CONFIG": str(cfg),
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"})
    return env


def install_collection(workdir: Path) -> Path:
    """`ansible-galaxy collection build` + `install` into the work directory."""
    bindir = Path(sys.executable).parent
    dist = workdir / "collection-dist"
    subprocess.run([str(bindir / "ansible-galaxy"), "collection", "build", "--force",
                    "--output-path", str(dist), str(ROOT / "ansible_collections/stockade/fleet")],
                   check=True, capture_output=True, text=True, timeout=300)
    tarball = next(dist.glob("stockade-fleet-*.tar.gz"))
    subprocess.run([str(bindir / "ansible-galaxy"), "collection", "install", "--force",
                    "-p", str(workdir / "collections"), str(tarball)],
                   check=True, capture_output=True, text=True, timeout=300,
                   env=ansible_env(workdir))
    return tarball


def build_wheel(src: Path, out: Path) -> Path:
    """The agent's wheel, reproducible (fixed timestamps): same source, same sha256."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    return next(out.glob("stockade-*.whl"))


def upgraded_source(workdir: Path) -> Path:
    """The checkout's files with one change in the agent's code: a new build, same version."""
    dst = workdir / "src-upgrade"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split()
    for rel in files:
        if rel.startswith(("tests/", "bench/", "molecule/", "webui/tests")):
            continue
        src = ROOT / rel
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            (dst / rel).symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst / rel)
    init = dst / "agent/stockade/__init__.py"
    init.write_text(init.read_text() + f'BUILD = "{UPGRADE_MARK}"\n')
    return dst


def slowest_tasks(path: Path, top: int = 6) -> str:
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        return "-"
    return "; ".join(f"{name} {secs} s" for name, secs in list(times.items())[:top])


def playbook(guest, workdir: Path, name: str, extra: dict | None = None) -> dict:
    """ansible-playbook stockade.fleet.NAME over SSH; the guest's PLAY RECAP counters."""
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i",
            str(workdir / "inventory" / "hosts.yml"), f"stockade.fleet.{name}"]
    if extra:
        extra_file = workdir / f"extra-{name}.yml"
        extra_file.write_text(yaml.safe_dump(extra))
        argv += ["-e", f"@{extra_file}"]
    stamp = int(time.time())
    env = {**ansible_env(workdir), "STOCKADE_TASK_TIMES": str(workdir / f"tasks-{name}-{stamp}.json")}
    t = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)
    took = round(time.monotonic() - t, 1)
    FIGURES[f"slowest_tasks_{name}_{stamp}"] = slowest_tasks(Path(env["STOCKADE_TASK_TIMES"]))
    (workdir / f"ansible-{name}-{stamp}.log").write_text(proc.stdout + proc.stderr)
    m = re.search(r"^guest\s*:\s*(.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        journal = guest.ssh_run("systemctl status --no-pager stockade-agent;"
                                " journalctl -b --no-pager -u stockade-agent | tail -60",
                                timeout=120)
        raise AssertionError(f"ansible-playbook {name} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}\n"
                             f"guest's agent:\n{journal.stdout}")
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


def write_inventory(guest, workdir: Path, wheel: Path) -> None:
    """The user's own inventory: one host, the agent's wheel, the dependency wheels carried
    from the controller (the guest reaches no index), and a policy file beside it."""
    inv = workdir / "inventory"
    (inv / "policies").mkdir(parents=True, exist_ok=True)
    (inv / "policies" / "hostt.yaml").write_text(yaml.safe_dump(POLICY, sort_keys=False))
    guest.inventory(
        inv / "hosts.yml",
        stockade_agent_install_packages=False,  # everything is baked into the image
        stockade_agent_wheel=str(wheel),
        stockade_agent_offline_wheels_dir=str(image.paths()["wheels"]),
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
    """A prober's log, "<epoch> <result>" per line. The reboot cuts the probers off, so a
    line written as the guest went down can be torn: only whole lines count."""
    out = guest.ssh(f"cat {LOGS}/{name}/probe 2>/dev/null || true")
    lines = (line.split() for line in out.splitlines())
    return [(int(f[0]), f[1]) for f in lines if len(f) == 2 and f[0].isdigit()]


def reach(guest, name: str, url: str, tries: int = 1) -> bool:
    for _ in range(tries):
        proc = guest.ssh_run(f"podman exec {name} timeout 2 wget -q -O /dev/null {url}", timeout=60)
        if proc.returncode == 0:
            return True
    return False


def wait_until(fn, timeout: float, what: str, step: float = 2.0, fail: bool = True):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            if not fail:
                return value
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


DIAGNOSTICS = (
    "/opt/stockade/venv/bin/stockade status -o json",
    "journalctl -u stockade-agent --no-pager -n 80",
    "podman info --format '{{.Host.EventLogger}}'",
    "systemctl is-active podman.socket podman.service; ls -l /run/podman",
    "podman ps -a --format '{{.Names}} {{.Status}}'",
    "/opt/stockade/venv/bin/stockade observe --last 30",
    "/opt/stockade/venv/bin/stockade endpoint list",
    "for d in $(ls /sys/class/net | grep ^veth); do echo $d; tc filter show dev $d ingress;"
    " tc filter show dev $d egress; done",
    "ip -br addr; ip route",
)


def diagnostics(guest) -> str:
    """The guest's view when a step fails: the agent's status and log, Podman's events."""
    out = []
    for command in DIAGNOSTICS:
        try:
            proc = guest.ssh_run(command, timeout=120, tries=2)
            out.append(f"$ {command}  (exit {proc.returncode})\n"
                       f"{proc.stdout[-4000:]}{proc.stderr[-1000:]}")
        except Exception as exc:  # the diagnostics must never hide the failure itself
            out.append(f"$ {command}: {exc!r}")
    return "\n".join(out)


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
    install_collection(workdir)
    write_inventory(guest, workdir, build_wheel(ROOT, workdir / "dist-a"))
    recap = playbook(guest, workdir, "site")
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    figures["install_over_ssh_s"] = recap["seconds"]
    assert guest.ssh("systemctl is-active stockade-agent").strip() == "active"

    container(guest, "hostt-srv", SRV_IP, "hostt-srv", SERVER)
    container(guest, "hostt-cli", CLI_IP, "hostt-client", PROBE % SRV_IP)
    container(guest, "hostt-bad", BAD_IP, "hostt-intruder", PROBE % SRV_IP)
    if not wait_until(lambda: reach(guest, "hostt-cli", f"http://{SRV_IP}/"), 120,
                      "the allowed client to reach the server", fail=False):
        raise AssertionError("timed out after 120 s waiting for the allowed client to reach"
                             " the server\n" + diagnostics(guest))
    assert not reach(guest, "hostt-bad", f"http://{SRV_IP}/", tries=3), "denied peer got in"
    listed = guest.ssh("/opt/stockade/venv/bin/stockade endpoint list")
    for name in ("hostt-srv", "hostt-cli", "hostt-bad"):
        assert re.search(rf"^{name}\s.*\sready\s", listed, re.M), listed


L7_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hostt-l7}
spec:
  endpointSelector: {matchLabels: {app: hostt-srv}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: hostt-client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/ok"}]
"""


def test_http_rules_under_the_unit(guest):
    """The L7 proxy starts under the hardened unit (its own user, setpriv capabilities):
    GET /ok passes, another path gets the proxy's 403. The policy is removed afterwards,
    so the inventory's set is what the next playbook run finds."""
    cli = "/opt/stockade/venv/bin/stockade"
    guest.ssh(f"cat > /tmp/l7.yaml <<'EOF'\n{L7_POLICY}EOF\n{cli} policy import /tmp/l7.yaml")
    try:
        guest.ssh("podman exec hostt-srv sh -c 'echo ok > /var/www/ok; httpd -p 8080 -h /var/www'")
        assert wait_until(lambda: reach(guest, "hostt-cli", f"http://{SRV_IP}:8080/ok"), 60,
                          "GET /ok through the proxy", fail=False), diagnostics(guest)
        denied = guest.ssh_run(f"podman exec hostt-cli timeout 3 wget -O /dev/null"
                               f" http://{SRV_IP}:8080/other", timeout=60)
        assert "403" in denied.stderr, denied.stderr
        status = guest.ssh(f"{cli} status -o json")
        assert '"running": true' in status, status
    finally:
        guest.ssh(f"{cli} policy delete hostt-l7 >/dev/null; rm -f /tmp/l7.yaml")


def test_second_run_changes_nothing(guest, workdir, figures):
    recap = playbook(guest, workdir, "site")
    figures["second_run_s"] = recap["seconds"]
    assert recap["changed"] == 0, changed_tasks(recap["output"])  # type: ignore[arg-type]


def agent_pid(guest) -> int:
    return int(guest.ssh("systemctl show -p MainPID --value stockade-agent").strip())


def stream_lines(guest) -> list[int]:
    out = guest.ssh(f"cat {LOGS}/hostt-srv/stream")
    return [int(x) for x in out.split()]


def test_upgrade_keeps_connections(guest, workdir, figures):
    """The playbook rolls out a new build (same version, other content: installed because
    its sha256 differs) while a long-lived connection between two containers flows: it is
    never interrupted, and the denied peer stays denied throughout."""
    container(guest, "hostt-stream", STREAM_IP, "hostt-client", STREAM % (SRV_IP, SRV_IP),
              restart=False)
    if not wait_until(lambda: len(stream_lines(guest)) > 20, 120, "the stream", fail=False):
        raise AssertionError("timed out after 120 s waiting for the stream to flow\n"
                             + guest.ssh(f"cat {LOGS}/hostt-stream/exit 2>&1; true")
                             + diagnostics(guest))
    # the sampler's script in a file: systemd-run's command line is not a shell's
    guest.ssh(f"cat > /root/sampler.sh <<'EOF'\nwhile :; do echo $(date +%s.%N)"
              f" $(wc -l < {LOGS}/hostt-srv/stream); sleep 0.2; done > {LOGS}/samples\nEOF\n"
              f"rm -f {LOGS}/hostt-bad/probe; systemd-run -q --unit hostt-sampler"
              f" /bin/sh /root/sampler.sh")
    before_pid = agent_pid(guest)
    wheel_b = build_wheel(upgraded_source(workdir), workdir / "dist-b")
    t0 = float(guest.ssh("date +%s.%N"))
    recap = playbook(guest, workdir, "site", {"stockade_agent_wheel": str(wheel_b)})
    t1 = float(guest.ssh("date +%s.%N"))
    figures["upgrade_over_ssh_s"] = recap["seconds"]
    assert recap["changed"] > 0 and recap["failed"] == 0
    assert agent_pid(guest) != before_pid, "the agent was not restarted on its new build"
    mark = guest.ssh("/opt/stockade/venv/bin/python -c 'import stockade; print(stockade.BUILD)'")
    assert mark.strip() == UPGRADE_MARK
    n_after = len(stream_lines(guest))
    time.sleep(5)
    lines = stream_lines(guest)
    guest.ssh("systemctl stop hostt-sampler")
    assert guest.ssh_run(f"test -e {LOGS}/hostt-stream/exit").returncode != 0, (
        "the long-lived connection broke: " + guest.ssh(f"cat {LOGS}/hostt-stream/exit"))
    assert lines == list(range(1, len(lines) + 1)), "the stream lost or reordered data"
    assert len(lines) > n_after, "the stream stopped flowing after the upgrade"
    samples = [(float(t), int(n)) for t, n in
               (line.split() for line in guest.ssh(f"cat {LOGS}/samples").splitlines()
                if len(line.split()) == 2)]
    stall, last_t, last_n = 0.0, None, -1
    for t, n in samples:
        if n != last_n:
            last_t, last_n = t, n
        elif last_t is not None and t0 <= t <= t1 + 5:
            stall = max(stall, t - last_t)
    figures["upgrade_connections_interrupted"] = 0
    figures["upgrade_longest_stream_stall_s"] = round(stall, 2)
    bad = probes(guest, "hostt-bad")
    assert bad and not [p for p in bad if p[1] == "open"], "the denied peer got in during the upgrade"
    figures["upgrade_denied_probes"] = len(bad)
    guest.ssh("podman rm -f hostt-stream >/dev/null")


def test_reboot_enforces_before_containers_restart(guest, figures):
    """After a reboot the restored policy is in force before Podman restarts the
    `--restart always` containers: the denied prober, itself restarted from boot on,
    never reaches the server while the allowed one does."""
    guest.ssh(f"rm -f {LOGS}/hostt-cli/probe {LOGS}/hostt-bad/probe")
    figures["reboot_to_ssh_s"] = guest.reboot()
    boot = int(guest.ssh("date +%s").strip()) - int(float(
        guest.ssh("cut -d' ' -f1 /proc/uptime").strip()))
    # the probers wrote until the shutdown: only what they wrote after this boot counts
    try:
        wait_until(lambda: any(r == "open" and t >= boot for t, r in probes(guest, "hostt-cli")),
                   300, "the allowed client to reach the server after the reboot")
        wait_until(lambda: guest.ssh("systemctl is-active stockade-agent; true").strip() == "active",
                   120, "the agent to be active")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + guest.ssh(
            "systemctl status stockade-agent --no-pager -n 0; true") + diagnostics(guest)) from None
    time.sleep(5)
    bad = [(t, r) for t, r in probes(guest, "hostt-bad") if t >= boot]
    assert bad, "the denied prober did not run after the reboot"
    opened = [(t - boot, r) for t, r in bad if r == "open"]
    assert not opened, (f"the denied peer reached the server after boot: {opened[:5]}\n"
                        + diagnostics(guest))
    first_ok = min(t for t, r in probes(guest, "hostt-cli") if r == "open" and t >= boot) - boot
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
    recap = playbook(guest, workdir, "uninstall")
    assert recap["failed"] == 0
    figures["uninstall_s"] = recap["seconds"]
    left = guest.ssh(
        "ls -d /etc/systemd/system/stockade-agent* /etc/systemd/system/stockade-webui*"
        " /lib/systemd/system/stockade* /etc/stockade"
        " /opt/stockade /var/lib/stockade /run/stockade /var/log/stockade /sys/fs/bpf/stockade"
        " /usr/local/sbin/stockade-agentctl /usr/local/sbin/stockade-webui* 2>/dev/null;"
        " getent passwd stockade-webui;"
        # stockade-sshkey is the image's own (the test's SSH key), not the role's
        " systemctl list-units --all --no-legend 'stockade*' | grep -v stockade-sshkey;"
        " for l in $(ls /sys/class/net); do tc filter show dev $l ingress 2>/dev/null;"
        " tc filter show dev $l egress 2>/dev/null; done | grep -i stockade;"
        " nft list tables 2>/dev/null | grep -i stockade; true")
    assert left.strip() == "", f"left behind after uninstall:\n{left}"
