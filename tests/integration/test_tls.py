"""TLS between the services: servers that require client certificates (mTLS), and the
services' own outgoing calls (here profile's consent cache) speaking TLS with the
suite's certificate, as the prod overlay sets them up."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.clients import channel_credentials
from shared.settings import load_settings


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_suite_certificates(directory: Path) -> dict[str, Path]:
    """A CA and one certificate for the suite (server and client auth, SAN localhost/127.0.0.1)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("najimi test CA"))
        .issuer_name(_name("najimi test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("najimi"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": directory / "ca.crt", "cert": directory / "tls.crt", "key": directory / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


async def test_services_call_each_other_over_mutual_tls(start_service, dev_tokens, tmp_path):
    files = write_suite_certificates(tmp_path)
    tls = {
        "tls_cert_file": files["cert"],
        "tls_key_file": files["key"],
        "tls_client_ca_file": files["ca"],
        "tls_ca_file": files["ca"],
    }
    consent = await start_service("consent", **tls)
    profile = await start_service(
        "profile",
        consent_address=f"localhost:{consent.running.port}",
        service_token=dev_tokens["service:profile"],
        **tls,
    )
    # Profile's consent cache reached consent over mTLS (consent refuses anything else).
    cache = profile.running.app.registrations[0].servicer.consent
    assert await cache.wait_synced(10), "profile's consent cache did not sync over TLS"

    # A client presenting the suite's certificate is served ...
    settings = load_settings("profile", data_dir=tmp_path, **tls)
    credentials = channel_credentials(settings)
    assert credentials is not None
    async with grpc.aio.secure_channel(f"localhost:{consent.running.port}", credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # ... one that verifies the server but has no client certificate is refused.
    anonymous = grpc.ssl_channel_credentials(files["ca"].read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{consent.running.port}", anonymous) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("a client without a certificate was served")


def test_plaintext_unless_a_ca_is_configured(tmp_path):
    assert channel_credentials(load_settings("profile", data_dir=tmp_path)) is None
