"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas, and holds
what a platform team relies on (probes, resources, least privilege, network paths,
configuration from ConfigMaps and Secrets, every setting accounted for)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
from google.protobuf import descriptor_pool

from shared.auth import hash_token
from tests.deploy.manifests import (
    K8S,
    KUBERNETES_VERSION,
    SUITE,
    TARGETS,
    base_name,
    config_maps,
    containers,
    documented_settings,
    environment,
    grpc_servers,
    labels_match,
    name,
    of_kind,
    pod_template,
    port_named,
    render,
    secret_variables,
    settings_variables,
    workloads,
)

# The calls between the suite's services (caller, callee) of README, "Data flows"; nothing else.
DESIGN_CALLS = {
    ("profile", "consent"),
    ("recommendation", "consent"),
    ("replenishment", "consent"),
    ("consent", "profile"),
    ("consent", "recommendation"),
    ("consent", "replenishment"),
    ("recommendation", "profile"),
}
# Secrets prod gets from outside (README, "Deploy on Kubernetes") besides those the dev
# overlay ships examples of: the suite's certificate, in cert-manager's layout.
PROD_ONLY_SECRETS = {"najimi-tls": {"tls.crt", "tls.key", "ca.crt"}}


def validation_errors(objects: list[dict[str, Any]]) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            errors.append(f"{obj['kind']}/{name(obj)}: {getattr(error, 'message', error)}")
    return errors


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_and_validates_strictly(target: str) -> None:
    objects = render(target)
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap", "NetworkPolicy"} <= {
        o["kind"] for o in objects
    }
    assert validation_errors(objects) == []


def test_the_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(of_kind(render("base"), "Deployment")[0])
    pod_template(deployment)["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    errors = validation_errors([deployment])
    assert len(errors) == 1 and "readinesProbe" in errors[0]


@pytest.mark.parametrize("target", TARGETS)
def test_every_workload_runs_least_privileged_with_resources(target: str) -> None:
    objects = render(target)
    accounts = {name(sa): sa for sa in of_kind(objects, "ServiceAccount")}
    problems = []
    for workload, template in workloads(objects):
        where = f"{workload['kind']}/{name(workload)}"
        spec = template["spec"]
        pod_security = spec.get("securityContext", {})
        account = accounts.get(spec.get("serviceAccountName", ""))
        if account is None or account.get("automountServiceAccountToken") is not False:
            problems.append(
                f"{where}: needs a ServiceAccount of its own with automountServiceAccountToken: false"
            )
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: the pod's seccompProfile must be RuntimeDefault")
        writable = {m["mountPath"] for c in containers(template) for m in c.get("volumeMounts", [])}
        for container in containers(template):
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                problems.append(f"{where}/{container['name']}: runAsNonRoot")
            if pod_security.get("runAsUser", 1) == 0 or security.get("runAsUser", 1) == 0:
                problems.append(f"{where}/{container['name']}: runs as root")
            expected = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
            for key, value in expected.items():
                if security.get(key) is not value:
                    problems.append(f"{where}/{container['name']}: securityContext.{key} must be {value}")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}/{container['name']}: capabilities.drop must be [ALL]")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                    problems.append(f"{where}/{container['name']}: resources.{kind} needs cpu and memory")
        if "/tmp" not in writable and workload["kind"] != "StatefulSet":
            problems.append(f"{where}: the root file system is read-only: mount an emptyDir at /tmp")
    assert problems == []


def replica_counts(objects: list[dict[str, Any]]) -> dict[str, int]:
    """Deployment -> its replicas: its own, or its HorizontalPodAutoscaler's minReplicas (a
    Deployment an HPA scales leaves `replicas` unset, so that an apply never scales it down)."""
    scaled = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")}
    counts = {}
    for deployment in of_kind(objects, "Deployment"):
        own = deployment["spec"].get("replicas")
        hpa = scaled.get(name(deployment))
        assert (own is None) == (hpa is not None), f"{name(deployment)}: replicas, or an HPA, not both"
        counts[name(deployment)] = own if hpa is None else hpa["spec"]["minReplicas"]
    return counts


@pytest.mark.parametrize("target", TARGETS)
def test_every_deployment_has_replicas_and_spreads_across_nodes(target: str) -> None:
    objects = render(target)
    assert all(count >= 1 for count in replica_counts(objects).values())
    for deployment in of_kind(objects, "Deployment"):
        spread = pod_template(deployment)["spec"].get("topologySpreadConstraints", [])
        assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread), name(deployment)
        for constraint in spread:
            assert labels_match(constraint["labelSelector"], pod_template(deployment)["metadata"]["labels"])


def test_prod_runs_several_replicas_and_dev_one() -> None:
    assert all(n >= 2 for n in replica_counts(render("overlays/prod")).values())
    assert all(n == 1 for n in replica_counts(render("overlays/dev")).values())


def probe_service_is_registered(service: str, grpc_service: str) -> bool:
    """Whether `grpc_service` is a service of `service`'s own proto package."""
    __import__(f"najimi.{service}.v1.{service}_service_pb2")
    found = descriptor_pool.Default().FindServiceByName(grpc_service)
    return found.full_name.startswith(f"najimi.{service}.v1.")


@pytest.mark.parametrize("target", ["base", "overlays/dev"])
def test_grpc_servers_have_builtin_grpc_probes_naming_their_service(target: str) -> None:
    servers = list(grpc_servers(render(target)))
    assert sorted(service for _, _, service in servers) == sorted(SUITE)
    for _deployment, container, service in servers:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {}).get("grpc")
            assert probe is not None, f"{service}: {kind} must be a grpc probe"
            assert probe["port"] == port_named(container, "grpc"), f"{service}: {kind} port"
            assert probe_service_is_registered(service, probe["service"]), f"{service}: {kind} {probe}"


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_documented_workers_run_without_probes(target: str) -> None:
    objects = render(target)
    unprobed = {
        name(d)
        for d in of_kind(objects, "Deployment")
        for c in pod_template(d)["spec"]["containers"]
        if not all(k in c for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    }
    # The trait worker serves no port and has no health endpoint (deploy/k8s/base/profile-traits.yaml).
    assert unprobed == {"profile-traits"}


def test_prod_probes_ask_the_same_health_service_over_mutual_tls() -> None:
    objects = render("overlays/prod")
    for _deployment, container, service in grpc_servers(objects):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {})
            assert "grpc" not in probe, f"{service}: kubelet grpc probes speak plaintext only"
            command = probe["exec"]["command"]
            flags = dict(arg.lstrip("-").partition("=")[::2] for arg in command[1:])
            assert command[0] == "grpc_health_probe"
            assert flags["addr"] == f"127.0.0.1:{port_named(container, 'grpc')}"
            assert probe_service_is_registered(service, flags["service"])
            assert "tls" in flags and flags["tls-server-name"] == service
            mounted = {m["mountPath"] for m in container["volumeMounts"]}
            for flag in ("tls-ca-cert", "tls-client-cert", "tls-client-key"):
                assert flags[flag].rsplit("/", 1)[0] in mounted, f"{service}: {flag} is not mounted"
        env = environment(objects, container)
        for variable in ("NAJIMI_TLS_CERT_FILE", "NAJIMI_TLS_KEY_FILE", "NAJIMI_TLS_CLIENT_CA_FILE"):
            assert env[variable]["value"].startswith("/etc/najimi/tls/"), f"{service}: {variable}"


@pytest.mark.parametrize("target", TARGETS)
def test_ports_metrics_and_services_agree_with_the_configuration(target: str) -> None:
    objects = render(target)
    services = of_kind(objects, "Service")
    for deployment, container, service in grpc_servers(objects):
        env = environment(objects, container)
        grpc_port, metrics_port = port_named(container, "grpc"), port_named(container, "metrics")
        assert env["NAJIMI_HOST"]["value"] == "0.0.0.0", service  # noqa: S104 - a pod must listen on its IP
        assert int(env["NAJIMI_PORT"]["value"]) == grpc_port, service
        assert int(env["NAJIMI_METRICS_PORT"]["value"]) == metrics_port, service
        labels = pod_template(deployment)["metadata"]["labels"]
        [svc] = [s for s in services if labels_match({"matchLabels": s["spec"]["selector"]}, labels)]
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["grpc"]["targetPort"] in ("grpc", grpc_port), service
        assert ports["metrics"]["targetPort"] in ("metrics", metrics_port), service
        annotations = svc["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", service
        assert annotations.get("prometheus.io/port") == str(ports["metrics"]["port"]), service


@pytest.mark.parametrize("target", TARGETS)
def test_termination_grace_outlasts_the_drain_and_the_graceful_stop(target: str) -> None:
    objects = render(target)
    for deployment, container, service in grpc_servers(objects):
        env = environment(objects, container)
        delay = float(env["NAJIMI_SHUTDOWN_DELAY_SECONDS"]["value"])
        grace = float(env["NAJIMI_GRACE_SECONDS"]["value"])
        assert delay > 0 or container.get("lifecycle", {}).get("preStop"), f"{service}: endpoints must drain"
        period = pod_template(deployment)["spec"]["terminationGracePeriodSeconds"]
        assert period > delay + grace, f"{service}: {period} s <= {delay} + {grace} s"


@pytest.mark.parametrize("target", TARGETS)
def test_every_server_has_a_disruption_budget_and_profile_and_recommendation_autoscale(target: str) -> None:
    objects = render(target)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment, _container, service in grpc_servers(objects):
        labels = pod_template(deployment)["metadata"]["labels"]
        assert any(labels_match(b["spec"]["selector"], labels) for b in budgets), f"{service}: no PDB"
    scaled = {
        hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert set(scaled) == {"profile", "recommendation"}
    deployments = {name(d) for d in of_kind(objects, "Deployment")}
    for target_name, hpa in scaled.items():
        assert target_name in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", TARGETS)
def test_recommendation_replicas_and_training_share_the_model_volume(target: str) -> None:
    objects = render(target)
    claims = {name(c): c for c in of_kind(objects, "PersistentVolumeClaim")}

    def model_mounts(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        return [
            (volumes[m["name"]]["persistentVolumeClaim"]["claimName"], m)
            for c in containers(template)
            for m in c.get("volumeMounts", [])
            if m["name"] in volumes
        ]

    [deployment] = [d for d in of_kind(objects, "Deployment") if name(d) == "recommendation"]
    [training] = of_kind(objects, "CronJob")
    [(serving_claim, serving_mount)] = model_mounts(pod_template(deployment))
    [(training_claim, training_mount)] = model_mounts(pod_template(training))
    assert serving_claim == training_claim and serving_claim in claims
    assert serving_mount["mountPath"] == training_mount["mountPath"]
    assert serving_mount.get("readOnly") is True and not training_mount.get("readOnly")
    # Both read and write the artefacts where the volume is mounted (NAJIMI_MODEL_DIR).
    for template in (pod_template(deployment), pod_template(training)):
        [container] = containers(template)
        assert environment(objects, container)["NAJIMI_MODEL_DIR"]["value"] == serving_mount["mountPath"]
    if target != "overlays/dev":  # one node in dev: ReadWriteOnce
        assert claims[serving_claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def selected_pods(objects: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        template
        for _w, template in workloads(objects)
        if labels_match(selector, template["metadata"]["labels"])
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_name_ports_that_exist(target: str) -> None:
    """A named port must exist on the pods it opens (and on their Service): a misspelt
    name opens nothing, silently."""
    objects = render(target)
    services = of_kind(objects, "Service")
    problems = []
    for policy in of_kind(objects, "NetworkPolicy"):
        spec = policy["spec"]
        pods = selected_pods(objects, spec["podSelector"])
        if not pods:
            problems.append(f"{name(policy)}: its podSelector selects no pod")
        checks = [(rule, pods) for rule in spec.get("ingress", [])]
        for rule in spec.get("egress", []):
            peers = [p for p in rule.get("to", []) if "podSelector" in p and "namespaceSelector" not in p]
            checks += [(rule, selected_pods(objects, peer["podSelector"])) for peer in peers]
        for rule, targets in checks:
            for port in rule.get("ports", []):
                if not isinstance(port["port"], str):
                    continue
                for template in targets:
                    labels = template["metadata"]["labels"]
                    if not any(port_named(c, port["port"]) for c in containers(template)):
                        problems.append(f"{name(policy)}: no container port {port['port']!r} on {labels}")
                    for svc in services:
                        if labels_match({"matchLabels": svc["spec"].get("selector", {})}, labels):
                            if port["port"] not in {p.get("name") for p in svc["spec"]["ports"]}:
                                problems.append(
                                    f"{name(policy)}: Service {name(svc)} has no port {port['port']!r}"
                                )
    assert problems == []


def allowed(rule_peers: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Whether a same-namespace pod with `labels` is among the peers of a rule."""
    return any(
        "podSelector" in peer
        and "namespaceSelector" not in peer
        and labels_match(peer["podSelector"], labels)
        for peer in rule_peers
    )


def opens_grpc(rule: dict[str, Any]) -> bool:
    return not rule.get("ports") or any(p["port"] == "grpc" for p in rule["ports"])


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_allow_exactly_the_designed_calls(target: str) -> None:
    objects = render(target)
    policies = of_kind(objects, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ), "a default-deny policy (ingress and egress) for every pod"
    pods = {name(w): t["metadata"]["labels"] for w, t in workloads(objects)}

    def can(direction: str, own: dict[str, str], other: dict[str, str]) -> bool:
        peers_key = "from" if direction == "ingress" else "to"
        return any(
            labels_match(p["spec"]["podSelector"], own)
            and opens_grpc(rule)
            and allowed(rule.get(peers_key, []), other)
            for p in policies
            for rule in p["spec"].get(direction, [])
        )

    pairs = [(a, b) for a in pods for b in pods if b in SUITE and a != b]
    # Each end on its own: an extra egress rule is an extra permission even if the callee refuses.
    egress = {(a, b) for a, b in pairs if can("egress", pods[a], pods[b])}
    ingress = {(a, b) for a, b in pairs if can("ingress", pods[b], pods[a])}
    assert egress == DESIGN_CALLS, "egress rules between the suite's pods"
    assert ingress == DESIGN_CALLS, "ingress rules between the suite's pods"


def secret_refs(objects: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(where, Secret name, key) of every secretKeyRef and Secret volume item of the workloads."""
    refs = set()
    for workload, template in workloads(objects):
        for container in containers(template):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    refs.add((f"{name(workload)}/{entry['name']}", ref["name"], ref["key"]))
                    assert not ref.get("optional"), f"{name(workload)}: {entry['name']} may not be optional"
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                refs.add((f"{name(workload)}/volume {volume['name']}", volume["secret"]["secretName"], ""))
    return refs


def dev_secrets() -> dict[str, dict[str, str]]:
    return {
        name(s): {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        for s in of_kind(render("overlays/dev"), "Secret")
    }


@pytest.mark.parametrize("target", TARGETS)
def test_every_configmap_and_secret_reference_resolves(target: str) -> None:
    objects = render(target)
    maps = config_maps(objects)
    missing = []
    for workload, template in workloads(objects):
        for container in containers(template):
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in maps:
                    missing.append(f"{name(workload)}: ConfigMap {source['configMapRef']['name']}")
                assert "secretRef" not in source, "Secrets are referenced key by key (secretKeyRef)"
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("configMapKeyRef")
                if ref is not None and ref["key"] not in maps.get(ref["name"], {}):
                    missing.append(f"{name(workload)}: ConfigMap key {ref['name']}/{ref['key']}")
    # dev ships its (development-only) Secrets; base and prod get them from outside, under the
    # names and keys the dev Secrets show, plus the prod-only certificate.
    if target == "overlays/dev":
        known = {name(s): set(s.get("data", {})) for s in of_kind(objects, "Secret")}
    else:
        assert of_kind(objects, "Secret") == [], f"{target} must not carry Secret values"
        known = {base_name(n): set(keys) for n, keys in dev_secrets().items()} | PROD_ONLY_SECRETS
    for where, secret, key in secret_refs(objects):
        if secret not in known or (key and key not in known[secret]):
            missing.append(f"{where}: Secret {secret} key {key!r}")
    assert missing == []


def test_dev_secrets_work_together() -> None:
    """The development Secrets authenticate each service, reach the dev PostgreSQL and hold
    well-formed keys."""
    secrets = {base_name(n): values for n, values in dev_secrets().items()}
    hashes = json.loads(secrets["najimi-token-hashes"]["token-hashes.json"])
    tokens = json.loads((K8S / "overlays/dev/secrets/dev-tokens.json").read_text())
    assert {principal: hash_token(token) for principal, token in tokens.items()} == hashes
    password = secrets["najimi-postgres"]["password"]
    for service in SUITE:
        values = secrets[f"najimi-{service}"]
        assert hash_token(values["service-token"]) == hashes[f"service:{service}"]
        url = urlsplit(values["database-url"])
        assert (url.scheme, url.hostname, url.port, url.password) == (
            "postgresql",
            "postgres",
            5432,
            password,
        )
    for service, key in (("consent", "signing-key"), ("consent", "audit-key"), ("profile", "pii-key")):
        assert len(base64.b64decode(secrets[f"najimi-{service}"][key], validate=True)) == 32


def variables_set(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """NAJIMI_* variable -> the workloads that set it."""
    found: dict[str, set[str]] = {}
    for workload, template in workloads(objects):
        for container in containers(template):
            for variable in environment(objects, container):
                found.setdefault(variable, set()).add(name(workload))
    return {variable: where for variable, where in found.items() if variable.startswith("NAJIMI_")}


def test_every_setting_is_set_in_base_or_documented_as_optional() -> None:
    settings = settings_variables()
    optional = documented_settings()["optional"]
    set_in_base = variables_set(render("base"))
    unaccounted = sorted(set(settings) - set(set_in_base) - set(optional))
    assert not unaccounted, (
        f"{', '.join(unaccounted)}: read by the services (shared/settings.py) but neither set in "
        "deploy/k8s/base (najimi-config, <service>-config, or a secretKeyRef for a secret) nor listed "
        "with its reason under `optional:` in deploy/k8s/settings.yaml"
    )
    stale = sorted(set(optional) - set(settings))
    assert not stale, f"deploy/k8s/settings.yaml lists settings that do not exist: {stale}"


@pytest.mark.parametrize("target", TARGETS)
def test_manifests_set_no_unknown_najimi_variable(target: str) -> None:
    unknown = sorted(set(variables_set(render(target))) - set(settings_variables()))
    assert not unknown, f"{target} sets variables no service reads (misspelt?): {unknown}"


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_come_only_from_secrets_and_reach_the_services_that_need_them(target: str) -> None:
    objects = render(target)
    secret = secret_variables()
    problems = [
        f"ConfigMap {name}: {key} is a secret"
        for name, data in config_maps(objects).items()
        for key in data
        if key in secret
    ]
    for workload, template in workloads(objects):
        for container in containers(template):
            for variable, entry in environment(objects, container).items():
                if variable in secret and "secretKeyRef" not in entry.get("valueFrom", {}):
                    problems.append(f"{name(workload)}: {variable} must come from a Secret (secretKeyRef)")
    # A secret setting named after a service (NAJIMI_CONSENT_SIGNING_KEY) is set in that
    # service's server; a suite-wide one (a future NAJIMI_PAGE_TOKEN_KEY) in every server.
    settings = settings_variables()
    for _deployment, container, service in grpc_servers(objects):
        env = environment(objects, container)
        for variable in sorted(secret & set(settings)):
            owner = next((s for s in SUITE if variable.startswith(f"NAJIMI_{s.upper()}_")), None)
            if (
                owner in (None, service)
                and variable not in env
                and variable not in documented_settings()["optional"]
            ):
                problems.append(f"{service}: {variable} is not set (add a secretKeyRef to its Secret)")
    assert problems == []


@pytest.mark.parametrize("target", TARGETS)
def test_each_workload_reads_only_its_own_services_secret(target: str) -> None:
    """Least privilege between services: the consent pods never see profile's PII key, the
    migration of one schema never gets another service's database URL."""
    shared_secrets = {"najimi-token-hashes", "najimi-tls"}
    problems = []
    for workload, template in workloads(render(target)):
        for container in containers(template):
            # The migration Job has one container per service, named after it.
            owner = container["name"] if name(workload) == "najimi-migrate" else name(workload)
            service = next((s for s in (*SUITE, "postgres") if owner.startswith(s)), None)
            refs = [
                (entry["name"], entry["valueFrom"]["secretKeyRef"]["name"])
                for entry in container.get("env", [])
                if "secretKeyRef" in entry.get("valueFrom", {})
            ]
            for variable, secret in refs:
                if base_name(secret) not in {f"najimi-{service}", *shared_secrets}:
                    problems.append(f"{name(workload)}/{container['name']}: {variable} from {secret}")
        if name(workload) == "najimi-migrate":
            commands = sorted(tuple(c["command"]) for c in containers(template))
            assert commands == sorted(("najimi-migrate", s) for s in SUITE)
            assert all(c["command"][1] == c["name"] for c in containers(template))
    assert problems == []
