"""A real etcd cluster for tests: Debian's etcd-server 3.4, members as plain processes.

    with EtcdCluster(3) as cluster:                      # on 127.0.0.1, free ports
        cluster.endpoints                                # ["http://127.0.0.1:P", ...]
        cluster.kill(0); cluster.start_member(0)         # kill -9, start again (same data)
    with EtcdCluster(3, addresses=[...], tls=True) as c: # certificates made by CertAuthority
        c.ca.client("h1")                                # (cert, key) with CN h1
        c.enable_rbac(["h1", "h2"])                      # users/roles as docs/agent.md says

Members are stopped by their PIDs; data directories and certificates live in one
temporary directory removed on exit, also after a failure.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ETCD, ETCDCTL = "/usr/bin/etcd", "/usr/bin/etcdctl"
PREFIX = "/stockade/v1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CertAuthority:
    """A CA, member certificates (server + peer, the member's address in the SAN) and
    client certificates (CN = user), made with the ``cryptography`` library."""

    def __init__(self, directory: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockade-test-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = self.dir / "ca.crt"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, addresses: list[str] = (), *, server: bool = False) -> tuple[str, str]:
        x509, NameOID = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usages = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if addresses:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
        cert = b.sign(self.key, self._hashes.SHA256())
        cpath, kpath = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        cpath.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        kpath.write_bytes(key.private_bytes(self._ser.Encoding.PEM,
                                            self._ser.PrivateFormat.TraditionalOpenSSL,
                                            self._ser.NoEncryption()))
        os.chmod(kpath, 0o600)
        return str(cpath), str(kpath)

    def member(self, cn: str, addresses: list[str]) -> tuple[str, str]:
        path = self.dir / f"{cn}.crt"
        if path.exists():
            return str(path), str(self.dir / f"{cn}.key")
        return self.issue(cn, addresses, server=True)

    def client(self, cn: str) -> tuple[str, str]:
        path = self.dir / f"{cn}.crt"
        if path.exists():
            return str(path), str(self.dir / f"{cn}.key")
        return self.issue(cn)


class EtcdCluster:
    def __init__(self, size: int = 1, *, addresses: list[str] | None = None, tls: bool = False,
                 name: str = "sk", extra: list[str] = ()):
        self.size, self.tls, self.extra = size, tls, list(extra)
        self.addresses = addresses or ["127.0.0.1"] * size
        self.tmp = Path(tempfile.mkdtemp(prefix=f"stockade-etcd-{name}-"))
        self.ca = CertAuthority(self.tmp / "pki") if tls else None
        scheme = "https" if tls else "http"
        self.members = []
        for i, addr in enumerate(self.addresses):
            cport, pport = free_port(addr if addresses is None else "0.0.0.0"), \
                free_port(addr if addresses is None else "0.0.0.0")
            self.members.append({"name": f"{name}{i}", "addr": addr, "client": f"{scheme}://{addr}:{cport}",
                                 "peer": f"{scheme}://{addr}:{pport}", "data": self.tmp / f"m{i}",
                                 "proc": None})
        self.initial = ",".join(f"{m['name']}={m['peer']}" for m in self.members)
        self.started_once: set[int] = set()

    @property
    def endpoints(self) -> list[str]:
        return [m["client"] for m in self.members]

    def _argv(self, i: int) -> list[str]:
        m = self.members[i]
        argv = [ETCD, "--name", m["name"], "--data-dir", str(m["data"]),
                "--listen-client-urls", m["client"], "--advertise-client-urls", m["client"],
                "--listen-peer-urls", m["peer"], "--initial-advertise-peer-urls", m["peer"],
                "--initial-cluster", self.initial, "--initial-cluster-token", str(self.tmp.name),
                "--initial-cluster-state", "new", "--heartbeat-interval", "50",
                "--election-timeout", "500", "--logger", "zap", "--log-level", "warn",
                *self.extra]
        if self.tls:
            # every member's address: the members share the bridge of the root namespace,
            # so a peer connection may leave from another member's address, and etcd
            # checks a peer's certificate against the address it comes from
            cert, key = self.ca.member(m["name"], sorted(set(self.addresses)))
            ca = str(self.ca.ca_path)
            argv += ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
                     "--client-cert-auth", "--peer-cert-file", cert, "--peer-key-file", key,
                     "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"]
        return argv

    def start_member(self, i: int) -> None:
        m = self.members[i]
        log = open(self.tmp / f"m{i}.log", "ab")
        m["proc"] = subprocess.Popen(self._argv(i), stdout=log, stderr=subprocess.STDOUT)
        self.started_once.add(i)

    def start(self, timeout: float = 30) -> "EtcdCluster":
        for i in range(self.size):
            self.start_member(i)
        self.wait_healthy(timeout)
        return self

    def kill(self, i: int, sig=signal.SIGKILL) -> None:
        p = self.members[i]["proc"]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=10)
        self.members[i]["proc"] = None

    def ctl(self, *args: str, user: str = "root", endpoints: list[str] | None = None,
            check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
        argv = [ETCDCTL, "--endpoints", ",".join(endpoints or self.endpoints),
                "--command-timeout", "5s", "--dial-timeout", "2s"]
        if self.tls:
            cert, key = self.ca.client(user)
            argv += ["--cacert", str(self.ca.ca_path), "--cert", cert, "--key", key]
        r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "ETCDCTL_API": "3"})
        if check and r.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            live = [m["client"] for m in self.members if m["proc"] is not None]
            r = self.ctl("endpoint", "health", endpoints=live, check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = "".join((self.tmp / f"m{i}.log").read_text()[-2000:] for i in self.started_once)
                raise RuntimeError(f"etcd not healthy: {r.stderr}\n{logs}")
            time.sleep(0.2)

    def put_subnets(self, host: str, subnets: list[str], prefix: str = PREFIX) -> None:
        self.ctl("put", f"{prefix}/subnets/{host}", json.dumps({"subnets": subnets}))

    def enable_rbac(self, hosts: list[str], prefix: str = PREFIX) -> None:
        """root, and one user and role per host (docs/agent.md, "Security model")."""
        self.ctl("user", "add", "root", "--no-password")
        self.ctl("role", "add", "root")
        self.ctl("user", "grant-role", "root", "root")
        for h in hosts:
            self.ctl("user", "add", h, "--no-password")
            self.ctl("role", "add", h)
            self.ctl("role", "grant-permission", h, "readwrite", f"{prefix}/endpoints/{h}/", "--prefix=true")
            self.ctl("role", "grant-permission", h, "readwrite", f"{prefix}/nodes/{h}")
            self.ctl("role", "grant-permission", h, "read", f"{prefix}/", "--prefix=true")
            self.ctl("user", "grant-role", h, h)
        self.ctl("auth", "enable")

    def stop(self) -> None:
        for i in range(len(self.members)):
            try:
                self.kill(i, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(i)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
