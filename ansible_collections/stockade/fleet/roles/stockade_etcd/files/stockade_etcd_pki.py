# -*- coding: utf-8 -*-
# Copyright: Stockade contributors; Apache-2.0
"""The fleet store's certificates, made on the controller with the cryptography library
(a dependency of ansible-core, so every controller has it).

    python stockade_etcd_pki.py SPEC_JSON_BASE64

SPEC: {"dir": DIR, "ca_name": CN, "ca_days": N, "days": N, "renew_days": N,
       "members": {NAME: [SAN, ...]}, "clients": [CN, ...], "check": bool}

In DIR (0700): ca.key/ca.crt, member-NAME.key/.crt (server and peer: serverAuth and
clientAuth, its addresses and names in the SAN) and client-CN.key/.crt (clientAuth, CN =
the etcd user). A file is made only when it is missing, expires within renew_days, was not
signed by the current CA, or no longer names what the spec names; a new CA renews every
certificate. Prints {"changed": bool, "made": [file, ...]}.
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A member's CN has a space, which no inventory host name (an etcd user) can have: a
# member certificate can never authenticate as a host.
MEMBER_CN = "stockade-etcd member %s"


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def write_private(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_cert(path):
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None


def load_key(path):
    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError):
        return None


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def san_entries(sans):
    out = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


def cert_valid(cert, key, ca_cert, renew_days):
    if cert is None or key is None:
        return False
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        return False
    # not_valid_after_utc is cryptography 42+; older ones give a naive UTC datetime
    expires = getattr(cert, "not_valid_after_utc", None) or \
        cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    if expires - now() < datetime.timedelta(days=renew_days):
        return False
    if ca_cert is not None:
        if cert.issuer != ca_cert.subject:
            return False
        try:
            ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                        ec.ECDSA(cert.signature_hash_algorithm))
        except InvalidSignature:
            return False
    return True


def leaf_matches(cert, cn, sans, usages):
    if cert.subject != name(cn):
        return False
    try:
        eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return False
    if sorted(u.dotted_string for u in eku) != sorted(u.dotted_string for u in usages):
        return False
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = sorted(str(v.value) for v in have)
    except x509.ExtensionNotFound:
        have = []
    return have == sorted(str(v.value) for v in san_entries(sans))


def make_ca(spec):
    key = new_key()
    start = now() - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(name(spec["ca_name"])).issuer_name(name(spec["ca_name"]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=spec["ca_days"]))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(spec, ca_key, ca_cert, cn, sans, usages):
    key = new_key()
    start = now() - datetime.timedelta(minutes=5)
    builder = (x509.CertificateBuilder()
               .subject_name(name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=spec["days"]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_entries(sans)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def read_spec(arg):
    """The spec as the role sends it. Ansible before 2.19 templates every value to a
    string, so the numbers and the check flag are converted here."""
    spec = json.loads(base64.b64decode(arg))
    for k in ("ca_days", "days", "renew_days"):
        spec[k] = int(spec[k])
    check = spec.get("check", False)
    spec["check"] = check.strip().lower() in ("true", "yes", "1") if isinstance(check, str) else bool(check)
    return spec


def main(argv):
    spec = read_spec(argv[1])
    d, check, made = spec["dir"], spec.get("check", False), []
    if not check:
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)

    def path(n):
        return os.path.join(d, n)

    ca_key, ca_cert = load_key(path("ca.key")), load_cert(path("ca.crt"))
    if not cert_valid(ca_cert, ca_key, None, spec["renew_days"]) or ca_cert.subject != name(spec["ca_name"]):
        ca_key, ca_cert = make_ca(spec)
        made += ["ca.key", "ca.crt"]
        if not check:
            write_private(path("ca.key"), key_pem(ca_key))
            write_private(path("ca.crt"), ca_cert.public_bytes(serialization.Encoding.PEM))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    leaves = [("member-%s" % m, MEMBER_CN % m, sans, both) for m, sans in sorted(spec["members"].items())]
    leaves += [("client-%s" % c, c, [], [ExtendedKeyUsageOID.CLIENT_AUTH]) for c in sorted(set(spec["clients"]))]
    for base, cn, sans, usages in leaves:
        cert, key = load_cert(path(base + ".crt")), load_key(path(base + ".key"))
        if "ca.crt" not in made and cert_valid(cert, key, ca_cert, spec["renew_days"]) \
                and leaf_matches(cert, cn, sans, usages):
            continue
        made += [base + ".key", base + ".crt"]
        if not check:
            key, cert = make_leaf(spec, ca_key, ca_cert, cn, sans, usages)
            write_private(path(base + ".key"), key_pem(key))
            write_private(path(base + ".crt"), cert.public_bytes(serialization.Encoding.PEM))
    print(json.dumps({"changed": bool(made), "made": made}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
