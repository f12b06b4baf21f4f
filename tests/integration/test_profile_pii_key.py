"""Where the profile service's PII key comes from, and that the wrong key reads nothing."""

from __future__ import annotations

import base64
import os

import grpc
import pytest
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.app import PII_KEY_FILE, PII_KEY_VARIABLE, pii_master_key
from shared.settings import load_settings
from tests.conftest import rpc_error

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()


async def create_and_stop(start_service, database_url: str) -> str:
    first = await start_service("profile", database_url)
    created = await pb_grpc.ProfileServiceStub(first.channel).CreateCustomer(
        pb.CreateCustomerRequest(request_id="r", customer=pb.Customer(email="jane@example.com")),
        metadata=first.auth("admin"),
    )
    await first.running.stop(0)
    return created.customer.customer_id


async def test_the_key_from_the_environment_is_used_and_no_key_file_is_written(
    start_service, tmp_path, monkeypatch
):
    monkeypatch.setenv(PII_KEY_VARIABLE, KEY_A)
    database_url = f"sqlite:///{tmp_path / 'profile.db'}"
    customer_id = await create_and_stop(start_service, database_url)
    assert not (tmp_path / PII_KEY_FILE).exists()

    # Another key cannot read what the first one wrote: a server fault, never the data.
    monkeypatch.setenv(PII_KEY_VARIABLE, KEY_B)
    other_key = await start_service("profile", database_url)
    error = await rpc_error(
        pb_grpc.ProfileServiceStub(other_key.channel).GetCustomer(
            pb.GetCustomerRequest(customer_id=customer_id), metadata=other_key.auth("admin")
        )
    )
    assert error.code() == grpc.StatusCode.INTERNAL and "jane" not in error.details()
    await other_key.running.stop(0)

    monkeypatch.setenv(PII_KEY_VARIABLE, KEY_A)
    same_key = await start_service("profile", database_url)
    got = await pb_grpc.ProfileServiceStub(same_key.channel).GetCustomer(
        pb.GetCustomerRequest(customer_id=customer_id), metadata=same_key.auth("admin")
    )
    assert got.customer.email == "jane@example.com"


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_bad_key_in_the_environment_stops_the_service_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv(PII_KEY_VARIABLE, value)
    with pytest.raises(SystemExit) as stopped:
        pii_master_key(load_settings("profile", data_dir=tmp_path))
    assert PII_KEY_VARIABLE in str(stopped.value.code)


def test_a_key_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(PII_KEY_VARIABLE, raising=False)
    settings = load_settings("profile", data_dir=tmp_path)
    key = pii_master_key(settings)
    assert pii_master_key(settings) == key and len(key) == 32
    key_file = tmp_path / PII_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    os.chmod(key_file, 0o644)
    with pytest.raises(SystemExit) as stopped:
        pii_master_key(settings)
    assert "chmod 600" in str(stopped.value.code)
