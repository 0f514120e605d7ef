"""SeaweedFS's mutual TLS and ``security.toml``: a CA made per start, a certificate per component, JWT keys.

Of SeaweedFS only the S3 API (signed requests) is reachable without credentials: its master, volume,
filer and admin HTTP ports and all gRPC ports demand a client certificate of this CA, and volume and
filer reads and writes also need JWTs signed with the data directory's keys.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

from shared.embedded.private import write_private
from shared.embedded.process import LOCALHOST, StackError

# SeaweedFS components that get a certificate of their own; "client" is what the S3 gateway presents over HTTPS.
SEAWEED_TLS_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")


def write_seaweed_tls(directory: Path) -> dict[str, tuple[Path, Path]]:
    """A fresh CA and one certificate per SeaweedFS component, for gRPC and HTTPS with client certificates.

    Made on every start: the CA's private key is never written, so nothing but these certificates can join
    or talk to the cluster. Returns ``{component: (cert, key)}``; the CA certificate is ``directory/ca.crt``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise StackError("the `cryptography` package is missing: pip install cryptography") from exc

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gestalt embedded SeaweedFS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write_private(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM).decode())
    pairs: dict[str, tuple[Path, Path]] = {}
    for component in SEAWEED_TLS_COMPONENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"seaweedfs-{component}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
                # Each component is a server to some and a client to others.
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{component}.crt", directory / f"{component}.key"
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()).decode())
        pairs[component] = (cert_path, key_path)
    return pairs


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def seaweed_security_toml(secrets_: dict[str, str], tls_dir: Path, pairs: dict[str, tuple[Path, Path]]) -> str:
    """SeaweedFS's security.toml for the embedded stack (see `weed scaffold -config=security`)."""
    ca = str(tls_dir / "ca.crt")
    sections: dict[str, dict[str, str | int | bool]] = {
        # Volume servers accept writes and reads only with a JWT that the master (or the filer, for the S3
        # gateway) signs for one file id; the filer accepts HTTP writes and reads only with a JWT of its own.
        "jwt.signing": {"key": secrets_["seaweed_jwt_write"], "expires_after_seconds": 10},
        "jwt.signing.read": {"key": secrets_["seaweed_jwt_read"], "expires_after_seconds": 10},
        "jwt.filer_signing": {"key": secrets_["seaweed_filer_jwt_write"], "expires_after_seconds": 10},
        "jwt.filer_signing.read": {"key": secrets_["seaweed_filer_jwt_read"], "expires_after_seconds": 10},
        "access": {"ui": False},  # no volume server UI
        "filer.expose_directory_metadata": {"enabled": False},  # no filer UI, no directory listings
        "admin": {"user": "admin", "password": secrets_["seaweed_admin_password"]}, "grpc": {"ca": ca},
        # The S3 gateway reaches volume servers (and anything else over HTTP) with the client certificate.
        "https.client": {"enabled": True, "cert": str(pairs["client"][0]), "key": str(pairs["client"][1]), "ca": ca},
    }
    for component in ("master", "volume", "filer", "s3", "admin", "worker"):
        cert, key = pairs[component]
        # gRPC is mutual TLS: a plaintext or certificate-less client gets no answer.
        sections[f"grpc.{component}"] = {"cert": str(cert), "key": str(key)}
    sections["grpc.client"] = {"cert": str(pairs["client"][0]), "key": str(pairs["client"][1])}
    for component in ("master", "volume", "filer", "admin"):
        cert, key = pairs[component]
        # HTTP ports other than S3 speak HTTPS and demand a certificate of this stack's CA.
        sections[f"https.{component}"] = {"cert": str(cert), "key": str(key), "ca": ca}
    lines = ["# Written by gestalt on every start of the embedded stack; edits are overwritten.", ""]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
