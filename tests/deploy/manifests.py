"""Rendering and reading the Kubernetes manifests under deploy/k8s, for tests/deploy."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ("base", "overlays/dev", "overlays/prod")
# The Kubernetes version every rendered object must validate against (kubernetes-validate).
KUBERNETES_VERSION = "1.32.0"
SUITE = ("consent", "profile", "recommendation", "replenishment")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")
# kustomize's generators append a 10-character content hash to a ConfigMap's or Secret's name.
HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


def kubectl() -> str:
    """The kubectl binary; without one the tests fail in CI (CI=true) and skip elsewhere."""
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if found is None:
        message = "kubectl (with its built-in kustomize) is needed to render deploy/k8s: install it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@functools.cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/k8s/{target} failed:\n{result.stderr}")
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def render(target: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/k8s/<target>` renders (rendered once per session)."""
    return list(_rendered(target))


def name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def base_name(obj_name: str) -> str:
    """A generated ConfigMap's or Secret's name without kustomize's hash suffix."""
    return HASH_SUFFIX.sub("", obj_name)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a Deployment, StatefulSet, Job or CronJob."""
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"])
    return dict(obj["spec"]["template"])


def workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod template) for every object that runs pods."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, pod_template(obj)


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as the manifests use) selects `labels`."""
    assert not selector.get("matchExpressions"), "the checks read matchLabels selectors only"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {name(obj): obj.get("data", {}) for obj in of_kind(objects, "ConfigMap")}


def environment(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variable a container gets: name -> its env entry, or {"configMap": name} for a
    variable that comes from an envFrom ConfigMap (with {"value": ...} when it is rendered)."""
    maps = config_maps(objects)
    variables: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is not None:
            for key, value in maps.get(ref["name"], {}).items():
                variables[key] = {"name": key, "configMap": ref["name"], "value": value}
    for entry in container.get("env", []):
        variables[entry["name"]] = entry
    return variables


def settings_variables() -> dict[str, Any]:
    """NAJIMI_<FIELD> -> the Settings field, for every setting the services read."""
    return {f"NAJIMI_{field.upper()}": info for field, info in Settings.model_fields.items()}


def is_secret_type(field: Any) -> bool:
    return field.annotation is SecretStr


@functools.cache
def documented_settings() -> dict[str, Any]:
    """deploy/k8s/settings.yaml: the settings left unset on purpose, and the secret ones."""
    return dict(yaml.safe_load((K8S / "settings.yaml").read_text()))


def secret_variables() -> set[str]:
    """Variables that may come from a Secret only: SecretStr settings, and those listed."""
    listed = set(documented_settings()["secret"])
    return listed | {variable for variable, field in settings_variables().items() if is_secret_type(field)}


def grpc_servers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """(Deployment, its container, service name) for the suite's gRPC servers."""
    for deployment in of_kind(objects, "Deployment"):
        for container in pod_template(deployment)["spec"]["containers"]:
            command = container.get("command", [])
            if (
                command
                and command[0].removeprefix("najimi-") in SUITE
                and any(port.get("name") == "grpc" for port in container.get("ports", []))
            ):
                yield deployment, container, command[0].removeprefix("najimi-")


def port_named(container: dict[str, Any], port_name: str) -> int | None:
    for port in container.get("ports", []):
        if port.get("name") == port_name:
            return int(port["containerPort"])
    return None
