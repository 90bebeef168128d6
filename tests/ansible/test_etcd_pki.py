"""The stockade_etcd role's controller-side pieces without a cluster: the certificate
maker (files/stockade_etcd_pki.py) and the systemd unit (systemd-analyze verify)."""
import base64
import json
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_tooling import ROOT, playbook

ROLE = ROOT / "ansible_collections/stockade/fleet/roles/stockade_etcd"
PKI = ROLE / "files/stockade_etcd_pki.py"


def pki(d, check=False, **over):
    spec = {"dir": str(d), "ca_name": "Test CA", "ca_days": 3650, "days": 825, "renew_days": 30,
            "members": {"e1": ["192.0.2.11", "e1"], "e2": ["2001:db8::12", "e2"]},
            "clients": ["h1", "root"], "check": check, **over}
    r = subprocess.run([sys.executable, str(PKI), base64.b64encode(json.dumps(spec).encode()).decode()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cert(d, name):
    return x509.load_pem_x509_certificate((d / name).read_bytes())


def test_pki_makes_once_then_only_what_changed(tmp_path):
    d = tmp_path / "pki"
    r = pki(d, check=True)  # check mode: says what it would make, makes nothing
    assert r["changed"] and "ca.key" in r["made"] and not d.exists()
    first = pki(d)
    assert first["changed"] and set(first["made"]) == {
        "ca.key", "ca.crt", "member-e1.key", "member-e1.crt", "member-e2.key", "member-e2.crt",
        "client-h1.key", "client-h1.crt", "client-root.key", "client-root.crt"}
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in d.iterdir())
    ca, e2, h1 = cert(d, "ca.crt"), cert(d, "member-e2.crt"), cert(d, "client-h1.crt")
    assert e2.issuer == ca.subject and h1.issuer == ca.subject
    assert h1.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "h1"
    # a member's CN has a space: no host (etcd user) can be called that
    assert e2.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "stockade-etcd member e2"
    san = e2.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == ["2001:db8::12"]
    assert san.get_values_for_type(x509.DNSName) == ["e2"]
    eku = e2.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    eku = h1.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), str(d / "member-e1.crt"),
                           str(d / "client-root.crt")], capture_output=True).returncode == 0

    assert pki(d) == {"changed": False, "made": []}
    # a member's address changes, a client comes: only those are made
    r = pki(d, members={"e1": ["192.0.2.111", "e1"], "e2": ["2001:db8::12", "e2"]}, clients=["h1", "h2", "root"])
    assert sorted(r["made"]) == ["client-h2.crt", "client-h2.key", "member-e1.crt", "member-e1.key"]
    assert cert(d, "member-e2.crt") == e2
    # renewal: a certificate that expires within renew_days is made again
    r = pki(d, members={"e1": ["192.0.2.111", "e1"], "e2": ["2001:db8::12", "e2"]}, clients=["h1", "h2", "root"],
            renew_days=900)
    assert "ca.crt" not in r["made"] and "client-h1.crt" in r["made"] and "member-e2.crt" in r["made"]
    # a certificate not signed by the current CA is made again; a new CA renews everything
    (d / "ca.key").unlink()
    r = pki(d)
    assert {"ca.crt", "member-e1.crt", "member-e2.crt", "client-h1.crt", "client-root.crt"} <= set(r["made"])
    assert cert(d, "client-h1.crt").issuer == cert(d, "ca.crt").subject


def test_etcd_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: make setup installs the systemd package")
    r = playbook("tests/ansible/playbooks/etcd_unit.yml", "-e", f"stockade_etcd_run_dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-3000:]
    unit = (tmp_path / "stockade-etcd.service").read_text()
    assert "ExecStart=/usr/bin/etcd --config-file /etc/stockade/etcd/etcd.conf.yml" in unit
    assert "Type=notify" in unit and "User=etcd" in unit and "Restart=on-failure" in unit
