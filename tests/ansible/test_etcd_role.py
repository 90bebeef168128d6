"""The stockade_etcd role on this machine: three members as background processes on
loopback ports (each its own ports and directories) and two client hosts, all over the
local connection. Proves TLS with client certificates, one etcd user per host that may
write only its own keys, the controller-written subnets, idempotence, a rolling restart
on a change, and that absent leaves nothing behind."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_tooling import playbook

pytestmark = pytest.mark.root

PLAYBOOK = "tests/ansible/playbooks/etcd.yml"
MEMBERS = ("m1", "m2", "m3")
CLIENTS = {"c1": ["10.99.1.0/24"], "c2": ["10.99.2.0/24", "fd00:99:2::/64"]}


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Fleet:
    def __init__(self, base: Path):
        self.base = base
        self.ports = free_ports(2 * len(MEMBERS))
        self.pki = base / "pki"

    def host(self, name):
        return self.base / name

    def write_inventory(self, clients=CLIENTS, extra=""):
        lines = ["all:", "  vars:",
                 "    ansible_connection: local",
                 "    ansible_python_interpreter: /usr/bin/python3",
                 "    stockade_etcd_install_packages: false",
                 "    stockade_etcd_service_manager: process",
                 f"    stockade_etcd_pki_dir: {self.pki}",
                 "    stockade_etcd_clients: \"{{ groups['clients'] }}\"",
                 "    stockade_etcd_client_dir: \"" + str(self.base) + "/{{ inventory_hostname }}/client\"",
                 "    stockade_etcd_address: 127.0.0.1",
                 "    stockade_etcd_cluster_token: \"" + self.base.name + "\"",
                 "    h: \"" + str(self.base) + "/{{ inventory_hostname }}\"",
                 "    stockade_etcd_conf_dir: \"{{ h }}/conf\"",
                 "    stockade_etcd_data_dir: \"{{ h }}/data\"",
                 "    stockade_etcd_run_dir: \"{{ h }}/run\"",
                 "    stockade_etcd_log_file: \"{{ h }}/etcd.log\"",
                 "    stockade_etcd_ctl: \"{{ h }}/stockade-etcd-ctl\"",
                 extra,
                 "  children:",
                 "    stockade_etcd:",
                 "      hosts:"]
        for i, m in enumerate(MEMBERS):
            lines.append(f"        {m}: {{stockade_etcd_client_port: {self.ports[2 * i]}, "
                         f"stockade_etcd_peer_port: {self.ports[2 * i + 1]}}}")
        lines += ["    clients:", "      hosts:"]
        for c, subnets in clients.items():
            lines.append(f"        {c}: {{stockade_workload_subnets: {json.dumps(subnets)}}}")
        inv = self.base / "hosts.yml"
        inv.write_text("\n".join(line for line in lines if line) + "\n")
        return str(inv)

    def endpoints(self):
        return ",".join(f"https://127.0.0.1:{self.ports[2 * i]}" for i in range(len(MEMBERS)))

    def etcdctl(self, who, *args):
        """etcdctl as host `who` (its client certificate as the role installed it) or root."""
        if who == "root":
            d = self.host("m1") / "conf"
            cert, key, ca = d / "root.crt", d / "root.key", d / "ca.crt"
        else:
            d = self.host(who) / "client"
            cert, key, ca = d / "client.crt", d / "client.key", d / "ca.crt"
        return subprocess.run(["etcdctl", f"--endpoints={self.endpoints()}", f"--cacert={ca}",
                               f"--cert={cert}", f"--key={key}", "--command-timeout=5s", *args],
                              capture_output=True, text=True, timeout=30,
                              env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})

    def pids(self):
        out = {}
        for m in MEMBERS:
            f = self.host(m) / "run" / "etcd.pid"
            if f.exists():
                out[m] = int(f.read_text())
        return out

    def alive(self):
        return {m: p for m, p in self.pids().items() if Path(f"/proc/{p}").exists()
                and f"--config-file {self.host(m)}/conf/etcd.conf.yml" in
                Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()}


@pytest.fixture
def fleet():
    base = Path(tempfile.mkdtemp(prefix="stockade-etcd-test-", dir="/run"))
    base.chmod(0o755)  # etcd runs as user etcd: it must reach its data directory
    f = Fleet(base)
    try:
        yield f
    finally:
        if (base / "hosts.yml").exists():
            playbook("-i", str(base / "hosts.yml"), PLAYBOOK, "-e", "stockade_etcd_state=absent")
        for p in f.alive().values():  # only if absent failed: by PID file, never by name
            os.kill(p, 9)
        shutil.rmtree(base, ignore_errors=True)


def ok(r):
    return r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


@pytest.mark.timeout(900)
def test_role_deploys_tls_cluster_with_one_user_per_host(fleet):
    inv = fleet.write_inventory()
    r = playbook("-i", inv, PLAYBOOK, timeout=400)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert sorted(fleet.alive()) == list(MEMBERS)
    for m in MEMBERS:
        assert oct((fleet.host(m) / "data").stat().st_mode & 0o777) == "0o700"
        assert oct((fleet.host(m) / "conf" / "root.key").stat().st_mode & 0o777) == "0o600"
    assert oct(fleet.pki.stat().st_mode & 0o777) == "0o700"

    # TLS with client certificates: no certificate, no answer
    r = subprocess.run(["etcdctl", f"--endpoints={fleet.endpoints()}",
                        f"--cacert={fleet.host('c1')}/client/ca.crt", "--command-timeout=3s", "get", "x"],
                       capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"})
    assert r.returncode != 0
    # a plain-HTTP client gets nothing either
    r = subprocess.run(["etcdctl", f"--endpoints={fleet.endpoints().replace('https', 'http')}",
                        "--command-timeout=3s", "get", "x"],
                       capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"})
    assert r.returncode != 0

    p = "/stockade/v1"
    # c1 writes its own keys (under a lease, as the agent does)...
    assert ok(fleet.etcdctl("c1", "put", f"{p}/nodes/c1", '{"addresses": ["192.0.2.1"]}'))[0]
    assert ok(fleet.etcdctl("c1", "put", f"{p}/endpoints/c1/10.99.1.5", '{"labels": {}}'))[0]
    lease = fleet.etcdctl("c1", "lease", "grant", "30")
    assert lease.returncode == 0, lease.stderr
    lease_id = lease.stdout.split()[1]
    assert ok(fleet.etcdctl("c1", "put", "--lease", lease_id, f"{p}/endpoints/c1/10.99.1.6", "{}"))[0]
    # ...and not c2's, nor the subnets, nor anything outside the prefix
    for key in (f"{p}/nodes/c2", f"{p}/endpoints/c2/10.99.2.5", f"{p}/endpoints/c10/x",
                f"{p}/subnets/c1", f"{p}/nodes/c1x", "/elsewhere"):
        r = fleet.etcdctl("c1", "put", key, "x")
        assert r.returncode != 0 and "permission denied" in r.stderr, (key, r.stdout, r.stderr)
    r = fleet.etcdctl("c1", "del", f"{p}/endpoints/c2/", "--prefix")
    assert r.returncode != 0 and "permission denied" in r.stderr
    # everyone reads the whole prefix, nothing outside it; only root administers
    r = fleet.etcdctl("c2", "get", f"{p}/endpoints/", "--prefix", "--keys-only")
    assert r.returncode == 0 and f"{p}/endpoints/c1/10.99.1.5" in r.stdout, r.stderr
    assert fleet.etcdctl("c2", "get", "/elsewhere").returncode != 0
    assert "permission denied" in fleet.etcdctl("c2", "user", "list").stderr
    # the controller's subnets, read-only to the hosts
    r = fleet.etcdctl("c2", "get", f"{p}/subnets/", "--prefix")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    got = dict(zip(lines[::2], (json.loads(v) for v in lines[1::2]), strict=True))
    assert got == {f"{p}/subnets/c1": {"subnets": ["10.99.1.0/24"]},
                   f"{p}/subnets/c2": {"subnets": ["10.99.2.0/24", "fd00:99:2::/64"]}}
    # a member's certificate is no user's
    d = fleet.host("m2") / "conf"
    r = subprocess.run(["etcdctl", f"--endpoints={fleet.endpoints()}", f"--cacert={d}/ca.crt",
                        f"--cert={d}/member.crt", f"--key={d}/member.key", "get", f"{p}/nodes/c1"],
                       capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"})
    assert r.returncode != 0 and "permission denied" in r.stderr, r.stderr

    # a second run changes nothing and restarts nothing
    pids = fleet.pids()
    r = playbook("-i", inv, PLAYBOOK, timeout=300)
    assert r.returncode == 0 and "changed=0" in r.stdout and "changed=1" not in r.stdout, r.stdout[-3000:]
    assert fleet.pids() == pids, "a run without changes restarts nothing"

    # the inventory changes (c2's subnets, c1 gone, c3 new) and a member setting: only
    # that is written, and the members restart one at a time, each healthy before the next
    inv = fleet.write_inventory({"c2": ["10.99.20.0/24"], "c3": ["10.99.3.0/24"]})
    r = playbook("-i", inv, PLAYBOOK, "-e", "stockade_etcd_auto_compaction_retention=2", timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    assert r.stdout.count("RUNNING HANDLER [stockade.fleet.stockade_etcd : Restart the etcd member (process)]") == 1
    new = fleet.alive()
    assert sorted(new) == list(MEMBERS) and all(new[m] != pids[m] for m in MEMBERS)
    r = fleet.etcdctl("root", "get", f"{p}/subnets/", "--prefix")
    lines = r.stdout.split()
    assert dict(zip(lines[::2], lines[1::2], strict=True)) == {
        f"{p}/subnets/c2": '{"subnets":["10.99.20.0/24"]}', f"{p}/subnets/c3": '{"subnets":["10.99.3.0/24"]}'}
    assert ok(fleet.etcdctl("c3", "put", f"{p}/nodes/c3", "{}"))[0]
    assert fleet.etcdctl("c3", "put", f"{p}/nodes/c2", "{}").returncode != 0
    r = fleet.etcdctl("c2", "get", f"{p}/nodes/c1")  # the data survived the restarts
    assert r.returncode == 0 and "192.0.2.1" in r.stdout
    r = fleet.etcdctl("root", "endpoint", "health")
    assert r.returncode == 0, r.stderr

    # absent: processes, directories, certificates gone (the controller's PKI stays)
    r = playbook("-i", inv, PLAYBOOK, "-e", "stockade_etcd_state=absent", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert not fleet.alive()
    for h in (*MEMBERS, "c2", "c3"):
        left = sorted(str(x.relative_to(fleet.base)) for x in fleet.host(h).rglob("*")) \
            if fleet.host(h).exists() else []
        assert left == [], left
    assert (fleet.pki / "ca.key").exists()
