"""The Kubernetes manifests under deploy/kubernetes/: valid against Kubernetes' own schemas (strict),
KEDA objects with only the fields KEDA documents, every name they refer to defined in the tree, and
the workers, the Job, Flower and the central scheduler each set up as they must run. Offline: no
cluster, no broker.

Each check returns the problems it finds; the last test runs every check on broken copies of the
manifests, so each one is known to fail when it should.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from luigi_celery import cli
from luigi_celery.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
QUEUES_SOURCE = ROOT / "luigi_celery" / "queues.py"

# The Kubernetes version whose schemas the manifests must satisfy (one kubernetes-validate ships).
KUBERNETES_VERSION = "1.30"
NAMESPACE = "luigi-celery"
WORKER = "luigi-celery-worker"
WORKER_FILE = "worker-deployment.yaml"
JOB_FILE = "pipeline-job.yaml"
FLOWER_FILE = "flower.yaml"
SCHEDULER_FILE = "scheduler.yaml"
SECRET_FILE = "secret.yaml"
CONFIGMAP_FILE = "configmap.yaml"
KUSTOMIZATION = "kustomization.yaml"
WORKER_METRICS_PORT = 9541
DISPATCHER_METRICS_PORT = 9540
FLOWER_PORT = 5555
# The central scheduler: its port, and the Service dispatchers reach it by (--scheduler-url).
SCHEDULER_PORT = 8082
SCHEDULER_SERVICE = "scheduler"
SCHEDULER_STATE_URL = "LUIGI_CELERY_SCHEDULER_STATE_URL"
QUEUE_DEPTH_METRIC = "luigi_celery_queue_depth"
PLACEHOLDER = "REPLACE_ME"
MIN_GRACE_PERIOD = 600
# Variables a command reads besides the settings, and what a value must look like:
# `luigi-celery scheduler` takes its --state-url from the environment too.
COMMAND_VARIABLES = {SCHEDULER_STATE_URL: re.compile(r"(redis|rediss|unix)://\S+")}

# Not Kubernetes API kinds that kubernetes-validate knows: KEDA's CRDs (checked against KEDA's
# documented fields below) and kustomize's own file (checked with the cross-references).
NOT_VALIDATED = ("keda.sh/", "kustomize.config.k8s.io/")

# --- KEDA's documented fields, keda.sh/v1alpha1 -------------------------------------------------
# A dict is an object whose keys must be among its own; [shape] a list of that shape; a type a
# leaf (dict: any mapping, whose inner fields KEDA hands on, e.g. to the HPA).

SCALED_OBJECT_SPEC: dict[str, Any] = {
    "scaleTargetRef": {"name": str, "kind": str, "apiVersion": str, "envSourceContainerName": str},
    "pollingInterval": int,
    "cooldownPeriod": int,
    "initialCooldownPeriod": int,
    "idleReplicaCount": int,
    "minReplicaCount": int,
    "maxReplicaCount": int,
    "fallback": {"failureThreshold": int, "replicas": int, "behavior": str},
    "advanced": {
        "restoreToOriginalReplicaCount": bool,
        "horizontalPodAutoscalerConfig": {"name": str, "behavior": dict},
        "scalingModifiers": dict,
    },
    "triggers": [
        {
            "type": str,
            "metadata": dict,
            "name": str,
            "useCachedMetrics": bool,
            "authenticationRef": {"name": str, "kind": str},
            "metricType": str,
        }
    ],
}
TRIGGER_AUTHENTICATION_SPEC: dict[str, Any] = {
    "secretTargetRef": [{"parameter": str, "name": str, "key": str}],
    "configMapTargetRef": [{"parameter": str, "name": str, "key": str}],
    "env": [{"parameter": str, "name": str, "containerName": str}],
    "boundServiceAccountToken": [{"parameter": str, "serviceAccountName": str}],
    "podIdentity": dict,
    "hashiCorpVault": dict,
    "azureKeyVault": dict,
    "awsSecretManager": dict,
    "gcpSecretManager": dict,
}
KEDA_SPECS = {"ScaledObject": SCALED_OBJECT_SPEC, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SPEC}
OBJECT_METADATA = {"name": str, "namespace": str, "labels": dict, "annotations": dict}

# Per trigger type: the metadata keys KEDA documents, those it requires, one of which it needs
# (in the metadata or from the TriggerAuthentication), and the TriggerAuthentication parameters.
TRIGGER_METADATA = {
    "redis": {
        "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "listName", "listLength",
        "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl", "username", "usernameFromEnv",
        "passwordFromEnv",
    },
    "rabbitmq": {
        "host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName", "vhostName", "useRegex",
        "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl", "usernameFromEnv",
        "passwordFromEnv",
    },
    "prometheus": {
        "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
        "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes",
    },
}  # fmt: skip
TRIGGER_REQUIRED = {
    "redis": {"listName"},
    "rabbitmq": {"queueName", "mode", "value"},
    "prometheus": {"serverAddress", "query", "threshold"},
}
TRIGGER_ONE_OF = {
    "redis": {"address", "addressFromEnv", "host", "hostFromEnv"},
    "rabbitmq": {"host", "hostFromEnv"},
    "prometheus": {"serverAddress"},
}
TRIGGER_AUTH_PARAMETERS = {
    "redis": {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key"},
    "rabbitmq": {"host", "username", "password", "vhostName", "tls", "ca", "cert", "key", "workloadIdentityResource"},
    "prometheus": {"bearerToken", "username", "password", "ca", "cert", "key", "customAuthHeader", "customAuthValue"},
}
# The trigger fields that name the queue: they must name the queue the ConfigMap sets.
TRIGGER_QUEUE_KEY = {"redis": "listName", "rabbitmq": "queueName"}

KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "namespace", "resources", "components", "images", "labels", "commonLabels",
    "commonAnnotations", "namePrefix", "nameSuffix", "patches", "replicas", "configMapGenerator", "secretGenerator",
    "generatorOptions",
}  # fmt: skip


# --- reading the manifests ----------------------------------------------------------------------


def yaml_module() -> ModuleType:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is missing: pip install -e '.[test]'")
    return yaml


def kubernetes_validate_module() -> ModuleType:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import all_versions
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install -e '.[test]'")
    if not any(v.startswith(KUBERNETES_VERSION + ".") for v in all_versions()):
        pytest.fail(f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for {KUBERNETES_VERSION}")
    return kubernetes_validate


@dataclasses.dataclass(frozen=True)
class Doc:
    """One YAML document of one manifest file."""

    file: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(mapping(self.obj.get("metadata")).get("name", ""))

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}"


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def manifest_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


def load(root: Path) -> list[Doc]:
    yaml = yaml_module()
    docs = []
    for path in manifest_files(root):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is not None:
                docs.append(Doc(path.relative_to(root).as_posix(), obj))
    return docs


def find(docs: list[Doc], kind: str, file: str | None = None) -> list[Doc]:
    return [d for d in docs if d.kind == kind and (file is None or d.file == file)]


def one(docs: list[Doc], kind: str, file: str) -> Doc:
    found = find(docs, kind, file)
    assert len(found) == 1, f"expected one {kind} in {file}, found {len(found)}"
    return found[0]


def pod_template(doc: Doc) -> dict[str, Any]:
    spec = mapping(doc.obj.get("spec"))
    if doc.kind == "CronJob":
        spec = mapping(mapping(spec.get("jobTemplate")).get("spec"))
    return mapping(spec.get("template"))


def pod_spec(doc: Doc) -> dict[str, Any]:
    return mapping(pod_template(doc).get("spec"))


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def containers(doc: Doc) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [mapping(c) for c in [*items(spec.get("initContainers")), *items(spec.get("containers"))]]


def argv(container: dict[str, Any]) -> list[str]:
    """What the container runs, the image's entrypoint aside: its command (if any), then its args."""
    return [str(a) for a in [*items(container.get("command")), *items(container.get("args"))]]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def env_value(container: dict[str, Any], name: str) -> str | None:
    for var in items(container.get("env")):
        if mapping(var).get("name") == name and "value" in var:
            return str(var["value"])
    return None


def secret_keys(doc: Doc) -> set[str]:
    return set(mapping(doc.obj.get("data"))) | set(mapping(doc.obj.get("stringData")))


def config_value(docs: list[Doc], key: str) -> str | None:
    for doc in find(docs, "ConfigMap"):
        if key in mapping(doc.obj.get("data")):
            return str(doc.obj["data"][key])
    return None


def triggers(doc: Doc) -> list[dict[str, Any]]:
    return [mapping(t) for t in items(mapping(doc.obj.get("spec")).get("triggers"))]


def kustomization(root: Path) -> dict[str, Any]:
    return mapping(yaml_module().safe_load((root / KUSTOMIZATION).read_text()))


# --- the checks: each returns its problems ------------------------------------------------------


def schema_problems(root: Path) -> list[str]:
    """Every Kubernetes object, validated strictly (no unknown field) against KUBERNETES_VERSION."""
    kv = kubernetes_validate_module()
    problems = []
    for doc in load(root):
        if str(doc.obj.get("apiVersion", "")).startswith(NOT_VALIDATED):
            continue
        try:
            validated = kv.validate(doc.obj, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{doc}: {path}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            problems.append(f"{doc}: {e.message}")
        else:
            if validated != KUBERNETES_VERSION:
                problems.append(f"{doc}: validated against Kubernetes {validated}, not {KUBERNETES_VERSION}")
    return problems


def shape_problems(value: Any, shape: Any, where: str) -> Iterator[str]:
    """Where ``value`` strays from ``shape`` (see KEDA's documented fields above)."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            yield f"{where}: expected a mapping, got {value!r}"
            return
        for key, inner in value.items():
            if key not in shape:
                yield f"{where}: unknown field {key!r} (KEDA documents: {', '.join(sorted(shape))})"
            else:
                yield from shape_problems(inner, shape[key], f"{where}.{key}")
    elif isinstance(shape, list):
        if not isinstance(value, list):
            yield f"{where}: expected a list, got {value!r}"
            return
        for i, inner in enumerate(value):
            yield from shape_problems(inner, shape[0], f"{where}[{i}]")
    elif not isinstance(value, shape) or (shape is int and isinstance(value, bool)):
        yield f"{where}: expected {shape.__name__}, got {value!r}"


def hpa_behavior_problems(behavior: Any, where: str) -> list[str]:
    """A ScaledObject's HPA behaviour is the HPA's own: validate it inside an autoscaling/v2 HPA."""
    kv = kubernetes_validate_module()
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": WORKER}, "maxReplicas": 1, "behavior": behavior},
    }
    try:
        kv.validate(hpa, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as e:
        return [f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    return []


def keda_problems(root: Path) -> list[str]:
    """KEDA objects: documented fields only, string metadata, and every name they use defined."""
    docs = load(root)
    problems: list[str] = []
    keda = [d for d in docs if str(d.obj.get("apiVersion", "")).startswith("keda.sh/")]
    worker_deployments = {d.name for d in find(docs, "Deployment", WORKER_FILE)}
    auths = {d.name: d for d in find(docs, "TriggerAuthentication")}
    secrets = {d.name: secret_keys(d) for d in find(docs, "Secret")}
    for doc in keda:
        if doc.obj.get("apiVersion") != "keda.sh/v1alpha1":
            problems.append(f"{doc}: apiVersion {doc.obj.get('apiVersion')!r}, KEDA's is keda.sh/v1alpha1")
        if doc.kind not in KEDA_SPECS:
            problems.append(f"{doc}: kind {doc.kind!r} is not one of {sorted(KEDA_SPECS)}")
            continue
        problems += shape_problems(
            doc.obj, {"apiVersion": str, "kind": str, "metadata": OBJECT_METADATA, "spec": dict}, str(doc)
        )
        spec = mapping(doc.obj.get("spec"))
        problems += shape_problems(spec, KEDA_SPECS[doc.kind], f"{doc}: spec")
        if doc.kind == "TriggerAuthentication":
            for ref in items(spec.get("secretTargetRef")):
                ref = mapping(ref)
                if ref.get("name") not in secrets:
                    problems.append(f"{doc}: secretTargetRef names Secret {ref.get('name')!r}, not in the tree")
                elif ref.get("key") not in secrets[ref["name"]]:
                    problems.append(f"{doc}: Secret {ref['name']} has no key {ref.get('key')!r}")
            continue
        target = mapping(spec.get("scaleTargetRef"))
        if target.get("name") not in worker_deployments:
            problems.append(f"{doc}: scaleTargetRef {target.get('name')!r} is not the Deployment in {WORKER_FILE}")
        if target.get("kind", "Deployment") != "Deployment" or target.get("apiVersion", "apps/v1") != "apps/v1":
            problems.append(f"{doc}: scaleTargetRef must be an apps/v1 Deployment")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(f"{doc}: minReplicaCount {low} > maxReplicaCount {high}")
        behavior = mapping(mapping(spec.get("advanced")).get("horizontalPodAutoscalerConfig")).get("behavior")
        if behavior is not None:
            problems += hpa_behavior_problems(behavior, f"{doc}: advanced.horizontalPodAutoscalerConfig.behavior")
        if not triggers(doc):
            problems.append(f"{doc}: no triggers")
        for i, trigger in enumerate(triggers(doc)):
            problems += trigger_problems(trigger, f"{doc}: triggers[{i}]", auths)
    return problems


def trigger_problems(trigger: dict[str, Any], where: str, auths: dict[str, Doc]) -> list[str]:
    kind = trigger.get("type")
    if kind not in TRIGGER_METADATA:
        return [f"{where}: no documented field list for trigger type {kind!r}: add KEDA's to this test"]
    problems = []
    metadata = mapping(trigger.get("metadata"))
    for key, value in metadata.items():
        if key not in TRIGGER_METADATA[kind]:
            problems.append(f"{where}: {kind} trigger has no metadata key {key!r}")
        if not isinstance(value, str):
            problems.append(f"{where}: metadata {key} must be a string, got {value!r}")
    parameters: set[str] = set()
    ref = trigger.get("authenticationRef")
    if ref is not None:
        ref = mapping(ref)
        if ref.get("kind", "TriggerAuthentication") != "TriggerAuthentication" or ref.get("name") not in auths:
            problems.append(f"{where}: authenticationRef {ref.get('name')!r} is no TriggerAuthentication in the tree")
        else:
            auth = mapping(auths[ref["name"]].obj.get("spec"))
            refs = [*items(auth.get("secretTargetRef")), *items(auth.get("env"))]
            parameters = {str(mapping(r).get("parameter")) for r in refs}
            for parameter in sorted(parameters - TRIGGER_AUTH_PARAMETERS[kind]):
                problems.append(f"{where}: {kind} takes no authentication parameter {parameter!r} ({ref['name']})")
    for key in sorted(TRIGGER_REQUIRED[kind] - set(metadata)):
        problems.append(f"{where}: {kind} trigger needs metadata {key!r}")
    if not TRIGGER_ONE_OF[kind] & (set(metadata) | parameters):
        problems.append(f"{where}: {kind} trigger needs one of {sorted(TRIGGER_ONE_OF[kind])}")
    return problems


def reference_problems(docs: list[Doc]) -> list[str]:
    """Every name an object uses (Secret, ConfigMap, key, claim, Service selector, port, namespace) is defined."""
    problems: list[str] = []
    namespaces = {d.name for d in find(docs, "Namespace")}
    configmaps = {d.name: set(mapping(d.obj.get("data"))) for d in find(docs, "ConfigMap")}
    secrets = {d.name: secret_keys(d) for d in find(docs, "Secret")}
    claims = {d.name for d in find(docs, "PersistentVolumeClaim")}
    deployments = {d.name: d for d in find(docs, "Deployment")}
    for doc in docs:
        if doc.kind in ("Namespace", "Kustomization"):
            continue
        namespace = mapping(doc.obj.get("metadata")).get("namespace")
        if namespace not in namespaces:
            problems.append(f"{doc}: namespace {namespace!r} is not the Namespace in the tree ({sorted(namespaces)})")
    for doc in workloads(docs):
        spec, labels = pod_spec(doc), mapping(mapping(pod_template(doc).get("metadata")).get("labels"))
        selector = mapping(mapping(doc.obj.get("spec")).get("selector")).get("matchLabels")
        if doc.kind == "Deployment" and not (selector and mapping(selector).items() <= labels.items()):
            problems.append(f"{doc}: selector {selector} does not match its pod labels {labels}")
        volumes = {mapping(v).get("name"): mapping(v) for v in items(spec.get("volumes"))}
        for volume in volumes.values():
            claim = mapping(volume.get("persistentVolumeClaim")).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{doc}: volume {volume.get('name')} claims {claim!r}, no such PersistentVolumeClaim")
            for source, known in (("configMap", configmaps), ("secret", secrets)):
                if source in volume:
                    name = mapping(volume[source]).get("secretName" if source == "secret" else "name")
                    if name not in known:
                        problems.append(f"{doc}: volume {volume.get('name')} uses {source} {name!r}, not in the tree")
        for container in containers(doc):
            where = f"{doc}: container {container.get('name')}"
            for mount in items(container.get("volumeMounts")):
                if mapping(mount).get("name") not in volumes:
                    problems.append(f"{where}: mounts {mapping(mount).get('name')!r}, no such volume")
            for source in items(container.get("envFrom")):
                for ref_kind, known in (("configMapRef", configmaps), ("secretRef", secrets)):
                    ref = mapping(mapping(source).get(ref_kind))
                    if ref and ref.get("name") not in known and not ref.get("optional"):
                        problems.append(f"{where}: envFrom {ref_kind} {ref.get('name')!r}, not in the tree")
            for var in items(container.get("env")):
                value_from = mapping(mapping(var).get("valueFrom"))
                for ref_kind, known in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
                    ref = mapping(value_from.get(ref_kind))
                    if not ref or ref.get("optional"):
                        continue
                    if ref.get("name") not in known:
                        problems.append(f"{where}: {var.get('name')} from {ref_kind} {ref.get('name')!r}, not in tree")
                    elif ref.get("key") not in known[ref["name"]]:
                        problems.append(f"{where}: {var.get('name')}: {ref['name']} has no key {ref.get('key')!r}")
            ports = {mapping(p).get("name") for p in items(container.get("ports"))}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = mapping(container.get(probe))
                port = mapping(action.get("httpGet") or action.get("tcpSocket")).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{where}: {probe} uses port {port!r}, not a named port of the container")
    for doc in find(docs, "Service"):
        spec = mapping(doc.obj.get("spec"))
        selector = mapping(spec.get("selector"))
        matched = [
            d
            for d in deployments.values()
            if selector and selector.items() <= mapping(mapping(pod_template(d).get("metadata")).get("labels")).items()
        ]
        if not matched:
            problems.append(f"{doc}: selector {selector} matches no Deployment's pods")
            continue
        ports = {
            key
            for d in matched
            for c in containers(d)
            for p in items(c.get("ports"))
            for key in (mapping(p).get("name"), mapping(p).get("containerPort"))
        }
        for port in items(spec.get("ports")):
            target = mapping(port).get("targetPort", mapping(port).get("port"))
            if target not in ports:
                problems.append(f"{doc}: targetPort {target!r} is not a port of {', '.join(d.name for d in matched)}")
    for doc in find(docs, "HorizontalPodAutoscaler"):
        target = mapping(mapping(doc.obj.get("spec")).get("scaleTargetRef"))
        if target.get("kind") != "Deployment" or target.get("name") not in deployments:
            problems.append(f"{doc}: scaleTargetRef {target} is no Deployment in the tree")
    return problems


def settings_problems(root: Path) -> list[str]:
    """Every LUIGI_CELERY_* variable the manifests set is a luigi-celery setting, with a valid value;
    the example Secrets hold placeholders only; the visibility timeout outlasts the grace period."""
    docs = load(root)
    problems: list[str] = []
    settings = {f"LUIGI_CELERY_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    variables: list[tuple[str, str, str]] = []
    for doc in find(docs, "ConfigMap"):
        variables += [(str(doc), k, str(v)) for k, v in mapping(doc.obj.get("data")).items()]
    for doc in find(docs, "Secret"):
        variables += [(str(doc), k, str(v)) for k, v in mapping(doc.obj.get("stringData")).items()]
        if doc.obj.get("data"):
            problems.append(f"{doc}: an example Secret uses stringData only (plain, visibly placeholder values)")
        for key, value in mapping(doc.obj.get("stringData")).items():
            if PLACEHOLDER not in str(value):
                problems.append(f"{doc}: {key} is not marked {PLACEHOLDER}: an example must hold no real value")
    for doc in workloads(docs):
        for container in containers(doc):
            variables += [
                (str(doc), str(v.get("name")), str(v["value"])) for v in items(container.get("env")) if "value" in v
            ]
    for where, key, value in variables:
        if not key.startswith("LUIGI_CELERY_"):
            continue
        if key in COMMAND_VARIABLES:
            if not COMMAND_VARIABLES[key].fullmatch(value):
                problems.append(f"{where}: {key}={value!r} does not match {COMMAND_VARIABLES[key].pattern}")
            continue
        if key not in settings:
            problems.append(f"{where}: {key} is not a luigi-celery setting")
            continue
        try:
            load_settings(env={key: value}, use_luigi_config=False)
        except Exception as e:
            problems.append(f"{where}: {key}={value!r}: {e}")
    worker = one(docs, "Deployment", WORKER_FILE)
    grace = pod_spec(worker).get("terminationGracePeriodSeconds", 30)
    visibility = config_value(docs, "LUIGI_CELERY_VISIBILITY_TIMEOUT")
    seconds = float(visibility) if visibility and re.fullmatch(r"\d+(\.\d*)?", visibility) else None
    if seconds is None or not isinstance(grace, int) or seconds <= grace:
        problems.append(f"visibility timeout {visibility!r} must outlast the workers' grace period ({grace} s)")
    return problems


def worker_problems(root: Path) -> list[str]:
    """The worker Deployment: a warm shutdown's time, resources, the check probes, non-root, metrics."""
    docs = load(root)
    worker = one(docs, "Deployment", WORKER_FILE)
    spec = pod_spec(worker)
    problems: list[str] = []
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(grace, int) or grace < MIN_GRACE_PERIOD:
        problems.append(f"terminationGracePeriodSeconds {grace!r} < {MIN_GRACE_PERIOD}: too short for a warm shutdown")
    if "replicas" in mapping(worker.obj.get("spec")):
        problems.append("replicas is set: the autoscaler owns it, and each apply would reset it")
    workers = [c for c in containers(worker) if argv(c)[:2] == ["luigi-celery", "worker"]]
    if len(workers) != 1:
        return [*problems, f"expected one container running `luigi-celery worker`, found {len(workers)}"]
    container = workers[0]
    args = argv(container)
    problems += resources_problems(worker, container)
    cpu = str(mapping(mapping(container.get("resources")).get("requests")).get("cpu", ""))
    concurrency = flag_value(args, "--concurrency")
    if concurrency is not None and cpu.isdigit() and concurrency != cpu:
        problems.append(f"--concurrency {concurrency} does not match the CPU request {cpu}")
    if concurrency is None and flag_value(args, "--autoscale") is None:
        problems.append("neither --concurrency nor --autoscale: Celery would start one process per node CPU")
    hostname = flag_value(args, "--hostname") or flag_value(args, "-n") or "celery@%h"
    if hostname != "celery@%h":
        problems.append(f"--hostname {hostname}: the probes ask for celery@$(hostname)")
    for probe in ("livenessProbe", "readinessProbe"):
        command = " ".join(str(a) for a in items(mapping(mapping(container.get(probe)).get("exec")).get("command")))
        if not re.search(r"luigi-celery check --worker \"?celery@\$\(hostname\)\"?", command):
            problems.append(f"{probe} does not run `luigi-celery check --worker celery@$(hostname)`: {command!r}")
    problems += non_root_problems(worker, container)
    problems += metrics_problems(docs, worker, container, WORKER_METRICS_PORT, env_default=True)
    return problems


def resources_problems(doc: Doc, container: dict[str, Any]) -> list[str]:
    """Requests and limits, of CPU and memory both: the node's room is reserved, and a leak is stopped."""
    resources = mapping(container.get("resources"))
    problems = []
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(mapping(resources.get(part)))
        if missing:
            problems.append(f"{doc}: resources.{part} lacks {sorted(missing)}")
    return problems


def non_root_problems(doc: Doc, container: dict[str, Any]) -> list[str]:
    """runAsNonRoot, on the container or else on the pod."""
    non_root = mapping(container.get("securityContext")).get(
        "runAsNonRoot", mapping(pod_spec(doc).get("securityContext")).get("runAsNonRoot")
    )
    return [] if non_root is True else [f"{doc}: runAsNonRoot is not true"]


def http_probe(container: dict[str, Any], probe: str) -> tuple[Any, Any]:
    """(path, port number) of a container's httpGet probe, a named port resolved; (None, None) if none."""
    get = mapping(mapping(container.get(probe)).get("httpGet"))
    if not get:
        return None, None
    ports = {mapping(p).get("name"): mapping(p).get("containerPort") for p in items(container.get("ports"))}
    return get.get("path"), ports.get(get.get("port"), get.get("port"))


def pod_labels(doc: Doc) -> dict[str, Any]:
    return mapping(mapping(pod_template(doc).get("metadata")).get("labels"))


def replaces_every_pod_at_once(strategy: dict[str, Any], replicas: int) -> bool:
    """Whether a Deployment's rollout may stop every old pod before a new one is ready."""
    if strategy.get("type") == "Recreate":
        return True
    unavailable = mapping(strategy.get("rollingUpdate")).get("maxUnavailable", "25%")
    if isinstance(unavailable, str) and re.fullmatch(r"\d+%", unavailable):
        return replicas * int(unavailable[:-1]) // 100 >= replicas
    return isinstance(unavailable, int) and unavailable >= replicas


def scheduler_problems(root: Path) -> list[str]:
    """The central scheduler: replicas that take over from each other; readiness on the leader only
    (/readyz) and liveness on every replica (/healthz); a rollout that can finish although a standby
    is never ready; the state URL from a Secret; resources, non-root; and the Service `scheduler`
    sends traffic to its ready pods alone, on its port."""
    docs = load(root)
    scheduler = one(docs, "Deployment", SCHEDULER_FILE)
    spec = mapping(scheduler.obj.get("spec"))
    problems: list[str] = []
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 2:
        problems.append(f"{scheduler}: replicas {replicas!r}: with fewer than 2 no standby takes over")
    elif not replaces_every_pod_at_once(mapping(spec.get("strategy")), replicas):
        problems.append(
            f"{scheduler}: strategy {spec.get('strategy')} keeps a ready pod through a rollout, but a new pod is "
            "ready only once it leads, after the old leader is gone: the rollout would never end "
            "(maxUnavailable 100%, or Recreate)"
        )
    found = [c for c in containers(scheduler) if argv(c)[:2] == ["luigi-celery", "scheduler"]]
    if len(found) != 1:
        return [*problems, f"{scheduler}: expected one container running `luigi-celery scheduler`, found {len(found)}"]
    container, args = found[0], argv(found[0])
    port = flag_value(args, "--port") or str(SCHEDULER_PORT)
    if port != str(SCHEDULER_PORT):
        problems.append(f"{scheduler}: --port {port}, expected {SCHEDULER_PORT} (the Service's and the dispatchers')")
    if flag_value(args, "--state-url") is not None:
        problems.append(f"{scheduler}: the state URL on the command line; give {SCHEDULER_STATE_URL} from a Secret")
    state = [mapping(v) for v in items(container.get("env")) if mapping(v).get("name") == SCHEDULER_STATE_URL]
    if len(state) != 1 or "secretKeyRef" not in mapping(state[0].get("valueFrom")):
        problems.append(f"{scheduler}: {SCHEDULER_STATE_URL} must come from a secretKeyRef (replicas share it)")
    for probe, expected in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        path, probed = http_probe(container, probe)
        if path != expected or probed != SCHEDULER_PORT:
            problems.append(f"{scheduler}: {probe} is not GET {expected} on port {SCHEDULER_PORT}: {path} on {probed}")
    if http_probe(container, "startupProbe")[0] == "/readyz":
        problems.append(f"{scheduler}: startupProbe on /readyz: a standby never passes it, and is restarted for good")
    problems += resources_problems(scheduler, container)
    problems += non_root_problems(scheduler, container)
    services = [d for d in find(docs, "Service") if d.name == SCHEDULER_SERVICE]
    if len(services) != 1:
        return [*problems, f"expected one Service named {SCHEDULER_SERVICE!r}, found {len(services)}"]
    service = services[0]
    service_spec = mapping(service.obj.get("spec"))
    selector = mapping(service_spec.get("selector"))
    selected = [d.name for d in find(docs, "Deployment") if selector and selector.items() <= pod_labels(d).items()]
    if selected != [scheduler.name]:
        problems.append(f"{service}: selector {selector} selects {selected}, not the scheduler's pods alone")
    if service_spec.get("publishNotReadyAddresses"):
        problems.append(f"{service}: publishNotReadyAddresses sends calls to the standby too")
    declared = {mapping(p).get("name"): mapping(p).get("containerPort") for p in items(container.get("ports"))}
    routes = {
        mapping(p).get("port"): declared.get(target, target)
        for p in items(service_spec.get("ports"))
        for target in [mapping(p).get("targetPort", mapping(p).get("port"))]
    }
    if routes.get(SCHEDULER_PORT) != SCHEDULER_PORT:
        problems.append(f"{service}: port {SCHEDULER_PORT} does not reach the scheduler's port: {routes}")
    return problems


def metrics_problems(
    docs: list[Doc], doc: Doc, container: dict[str, Any], expected: int, env_default: bool = False
) -> list[str]:
    """The metrics port: the flag (or the environment), the container port and the scrape annotations
    agree; and it is served on every interface (luigi-celery's default, 127.0.0.1, is the pod's alone)."""
    args = argv(container)
    port = flag_value(args, "--metrics-port") or (
        env_value(container, "LUIGI_CELERY_METRICS_PORT") if env_default else None
    )
    address = (
        flag_value(args, "--metrics-address")
        or env_value(container, "LUIGI_CELERY_METRICS_ADDRESS")
        or config_value(docs, "LUIGI_CELERY_METRICS_ADDRESS")
    )
    annotations = mapping(mapping(pod_template(doc).get("metadata")).get("annotations"))
    declared = {mapping(p).get("containerPort") for p in items(container.get("ports"))}
    problems = []
    if port != str(expected):
        problems.append(f"{doc}: metrics port {port!r}, expected {expected}")
    if expected not in declared:
        problems.append(f"{doc}: no containerPort {expected} for the metrics")
    if address not in ("0.0.0.0", "::"):
        problems.append(f"{doc}: metrics address {address!r}: Prometheus cannot scrape a pod's 127.0.0.1")
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(expected):
        problems.append(f"{doc}: scrape annotations {annotations} do not name port {expected}")
    return problems


def job_and_flower_problems(root: Path) -> list[str]:
    docs = load(root)
    problems: list[str] = []
    job = one(docs, "Job", JOB_FILE)
    spec = mapping(job.obj.get("spec"))
    dispatchers = [c for c in containers(job) if argv(c)[:2] == ["luigi-celery", "run"]]
    if len(dispatchers) != 1:
        problems.append(f"{job}: expected one container running `luigi-celery run ...`, found {len(dispatchers)}")
    else:
        problems += metrics_problems(docs, job, dispatchers[0], DISPATCHER_METRICS_PORT)
    if pod_spec(job).get("restartPolicy") != "Never":
        problems.append(f"{job}: restartPolicy must be Never (the Job, not the kubelet, starts a dispatcher again)")
    for field in ("backoffLimit", "ttlSecondsAfterFinished"):
        if not isinstance(spec.get(field), int):
            problems.append(f"{job}: {field} is not set")
    flower = one(docs, "Deployment", FLOWER_FILE)
    flowers = [c for c in containers(flower) if argv(c)[:2] == ["luigi-celery", "flower"]]
    if len(flowers) != 1:
        return [*problems, f"{flower}: expected one container running `luigi-celery flower`"]
    container, args = flowers[0], argv(flowers[0])
    if flag_value(args, "--port") != str(FLOWER_PORT) or flag_value(args, "--address") != "0.0.0.0":
        problems.append(f"{flower}: not started with --port {FLOWER_PORT} --address 0.0.0.0: {args}")
    if "--basic-auth" in " ".join(args) or "--basic_auth" in " ".join(args):
        problems.append(f"{flower}: basic auth on the command line; use FLOWER_BASIC_AUTH from a Secret")
    auth = [mapping(v) for v in items(container.get("env")) if mapping(v).get("name") == "FLOWER_BASIC_AUTH"]
    if len(auth) != 1 or "secretKeyRef" not in mapping(auth[0].get("valueFrom")):
        problems.append(f"{flower}: FLOWER_BASIC_AUTH must come from a secretKeyRef")
    ports = {mapping(p).get("name"): mapping(p).get("containerPort") for p in items(container.get("ports"))}
    for probe in ("readinessProbe", "livenessProbe"):
        get = mapping(mapping(container.get(probe)).get("httpGet"))
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != "/healthcheck" or port != FLOWER_PORT:
            problems.append(f"{flower}: {probe} is not GET /healthcheck on port {FLOWER_PORT}: {get}")
    return problems


def string_literals(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def metric_problems(root: Path) -> list[str]:
    """The autoscalers read the metric the code exports, for the queue the ConfigMap sets."""
    docs = load(root)
    exported = string_literals(QUEUES_SOURCE)
    queue = config_value(docs, "LUIGI_CELERY_QUEUE") or "luigi"
    problems: list[str] = []
    for doc in find(docs, "HorizontalPodAutoscaler"):
        for metric in items(mapping(doc.obj.get("spec")).get("metrics")):
            external = mapping(mapping(metric).get("external"))
            name = mapping(external.get("metric")).get("name")
            if name != QUEUE_DEPTH_METRIC or name not in exported:
                problems.append(
                    f"{doc}: external metric {name!r} is not {QUEUE_DEPTH_METRIC} (from {QUEUES_SOURCE.name})"
                )
            labels = mapping(mapping(mapping(external.get("metric")).get("selector")).get("matchLabels"))
            if labels.get("queue") != queue:
                problems.append(f"{doc}: selects queue {labels.get('queue')!r}, the ConfigMap's is {queue!r}")
    for doc in find(docs, "ScaledObject"):
        for trigger in triggers(doc):
            metadata = mapping(trigger.get("metadata"))
            kind = trigger.get("type")
            if kind == "prometheus":
                query = str(metadata.get("query", ""))
                names = set(re.findall(r"\bluigi_celery_\w+", query))
                if QUEUE_DEPTH_METRIC not in names or not names <= exported:
                    problems.append(f"{doc}: query {query!r} does not read {QUEUE_DEPTH_METRIC} as exported")
                if f'queue="{queue}"' not in query:
                    problems.append(f"{doc}: query {query!r} does not select queue {queue!r}")
            elif kind in TRIGGER_QUEUE_KEY and metadata.get(TRIGGER_QUEUE_KEY[kind]) != queue:
                key = TRIGGER_QUEUE_KEY[kind]
                problems.append(f"{doc}: {key} {metadata.get(key)!r} is not the ConfigMap's queue {queue!r}")
    return problems


def autoscalers(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.kind in ("ScaledObject", "HorizontalPodAutoscaler")]


def kustomization_problems(root: Path) -> list[str]:
    """The kustomization lists existing files, the base has one autoscaler, every file is listed or
    documented as an alternative, the base is self-contained, and the image override applies."""
    config = kustomization(root)
    text = (root / KUSTOMIZATION).read_text()
    problems = [f"{KUSTOMIZATION}: unknown field {key!r}" for key in sorted(set(config) - KUSTOMIZATION_FIELDS)]
    listed = [str(r) for r in items(config.get("resources"))]
    for resource in listed:
        if not (root / resource).is_file():
            problems.append(f"{KUSTOMIZATION}: resource {resource} does not exist")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    documented = set(re.findall(r"[\w./-]+\.ya?ml", comments))
    for path in manifest_files(root):
        name = path.relative_to(root).as_posix()
        if name != KUSTOMIZATION and name not in listed and name not in documented:
            problems.append(f"{name} is neither a resource of {KUSTOMIZATION} nor documented there as an alternative")
    base = [d for d in load(root) if d.file in listed]
    scaling = autoscalers(base)
    if len(scaling) != 1:
        problems.append(f"the base must hold exactly one autoscaler, it holds {[str(d) for d in scaling]}")
    if config.get("namespace") != NAMESPACE:
        problems.append(f"{KUSTOMIZATION}: namespace {config.get('namespace')!r}, expected {NAMESPACE}")
    problems += [f"in the base alone: {p}" for p in reference_problems(base)]
    auths = {d.name for d in find(base, "TriggerAuthentication")}
    for doc in find(base, "ScaledObject"):
        for trigger in triggers(doc):
            ref = mapping(trigger.get("authenticationRef")).get("name")
            if ref is not None and ref not in auths:
                problems.append(f"in the base alone: {doc} uses TriggerAuthentication {ref!r}, not listed")
    images = {str(c.get("image", "")).split(":")[0] for d in workloads(base) for c in containers(d)}
    for image in items(config.get("images")):
        if mapping(image).get("name") not in images:
            problems.append(f"{KUSTOMIZATION}: image override {mapping(image).get('name')!r} matches no container")
    return problems


# --- the tests ----------------------------------------------------------------------------------


def test_every_manifest_is_valid_for_the_pinned_kubernetes_version():
    # Given every Kubernetes object under deploy/kubernetes (KEDA's and kustomize's aside)
    # Then each validates strictly against Kubernetes' own schemas
    assert len(load(MANIFESTS)) > 10
    assert schema_problems(MANIFESTS) == []


def test_keda_objects_use_only_the_fields_keda_documents():
    # Given the ScaledObjects and TriggerAuthentications (KEDA's CRDs, unknown to the schemas)
    docs = load(MANIFESTS)
    assert {d.kind for d in docs} >= {"ScaledObject", "TriggerAuthentication"}
    assert {t.get("type") for d in find(docs, "ScaledObject") for t in triggers(d)} == set(TRIGGER_METADATA)
    # Then each uses documented fields, string metadata, and names that exist
    assert keda_problems(MANIFESTS) == []


def test_every_name_a_manifest_uses_is_defined_in_the_tree():
    assert reference_problems(load(MANIFESTS)) == []


def test_settings_are_luigi_celery_settings_and_the_example_secrets_hold_placeholders():
    assert settings_problems(MANIFESTS) == []


def test_the_worker_shuts_down_warm_has_resources_probes_runs_as_non_root_and_exports_metrics():
    assert worker_problems(MANIFESTS) == []


def test_the_job_runs_the_dispatcher_and_flower_is_protected_and_probed():
    assert job_and_flower_problems(MANIFESTS) == []


def test_the_scheduler_replicas_take_over_and_its_service_routes_to_the_leader_alone():
    assert scheduler_problems(MANIFESTS) == []


def test_the_scheduler_reads_its_state_url_from_the_variable_the_secret_sets(monkeypatch, capsys):
    # Given the variable the scheduler's Secret sets, holding no Redis URL
    monkeypatch.setenv(SCHEDULER_STATE_URL, "http://redis:6379/1")
    # Then `luigi-celery scheduler` reads it (and refuses it) before it starts anything
    assert cli.main(["scheduler"]) == 2
    assert "--state-url must be redis://" in capsys.readouterr().err


def test_the_autoscalers_read_the_queue_depth_metric_the_code_exports():
    assert QUEUE_DEPTH_METRIC in string_literals(QUEUES_SOURCE)
    assert metric_problems(MANIFESTS) == []


def test_the_kustomization_is_a_self_contained_base_with_one_autoscaler():
    assert kustomization_problems(MANIFESTS) == []


# --- each check fails on a broken copy ----------------------------------------------------------

Check = Callable[[Path], list[str]]


def references(root: Path) -> list[str]:
    return reference_problems(load(root))


BROKEN_COPIES: list[tuple[str, Check, str, str, str, str]] = [
    # (what, check, file, old text, new text, a fragment of the expected problem)
    ("unknown field", schema_problems, WORKER_FILE, "imagePullPolicy: IfNotPresent",
     "imagePullPolicy: IfNotPresent\n          imagePulPolicy: Always", "imagePulPolicy"),
    ("wrong type", schema_problems, JOB_FILE, "backoffLimit: 2", 'backoffLimit: "2"', "backoffLimit"),
    ("misspelled KEDA metadata key", keda_problems, "keda-scaledobject-redis.yaml", "listName: luigi",
     "listname: luigi", "no metadata key 'listname'"),
    ("metadata not a string", keda_problems, "keda-scaledobject-rabbitmq.yaml", 'value: "2"', "value: 2",
     "must be a string"),
    ("unknown ScaledObject field", keda_problems, "keda-scaledobject-prometheus.yaml", "cooldownPeriod: 300",
     "coolDownPeriod: 300", "unknown field 'coolDownPeriod'"),
    ("wrong Secret key", keda_problems, "keda-scaledobject-redis.yaml", "key: redis-password",
     "key: redis_password", "has no key 'redis_password'"),
    ("missing TriggerAuthentication", keda_problems, "keda-scaledobject-rabbitmq.yaml",
     "    authenticationRef:\n        name: luigi-celery-rabbitmq", "    authenticationRef:\n        name: rabbit",
     "authenticationRef 'rabbit'"),
    ("unknown authentication parameter", keda_problems, "keda-scaledobject-redis.yaml", "parameter: password",
     "parameter: pasword", "'pasword'"),
    ("min above max", keda_problems, "keda-scaledobject-redis.yaml", "minReplicaCount: 1", "minReplicaCount: 30",
     "minReplicaCount 30 > maxReplicaCount 20"),
    ("wrong scale target", keda_problems, "keda-scaledobject-prometheus.yaml",
     "  scaleTargetRef:\n    name: luigi-celery-worker", "  scaleTargetRef:\n    name: luigi-celery-workers",
     "scaleTargetRef 'luigi-celery-workers'"),
    ("wrong KEDA apiVersion", keda_problems, "keda-scaledobject-redis.yaml", "apiVersion: keda.sh/v1alpha1",
     "apiVersion: keda.sh/v1", "keda.sh/v1alpha1"),
    ("bad HPA behaviour in KEDA", keda_problems, "keda-scaledobject-redis.yaml", "stabilizationWindowSeconds: 600",
     "stabilisationWindowSeconds: 600", "stabilisationWindowSeconds"),
    ("Service selector mismatch", references, FLOWER_FILE, "    app.kubernetes.io/component: flower\n  ports:",
     "    app.kubernetes.io/component: flowers\n  ports:", "matches no Deployment"),
    ("wrong secretKeyRef key", references, FLOWER_FILE, "key: FLOWER_BASIC_AUTH", "key: FLOWER_AUTH",
     "has no key 'FLOWER_AUTH'"),
    ("missing ConfigMap", references, JOB_FILE, "configMapRef:\n                name: luigi-celery",
     "configMapRef:\n                name: luigi-config", "'luigi-config'"),
    ("missing claim", references, WORKER_FILE, "claimName: luigi-celery-out", "claimName: outputs",
     "no such PersistentVolumeClaim"),
    ("Service port not on the pods", references, FLOWER_FILE, "targetPort: http", "targetPort: web",
     "targetPort 'web'"),
    ("wrong namespace", references, CONFIGMAP_FILE, "namespace: luigi-celery", "namespace: default",
     "namespace 'default'"),
    ("unknown setting", settings_problems, CONFIGMAP_FILE, "LUIGI_CELERY_QUEUE:", "LUIGI_CELERY_QUEUE_NAME:",
     "LUIGI_CELERY_QUEUE_NAME is not a luigi-celery setting"),
    ("invalid setting value", settings_problems, CONFIGMAP_FILE, 'LUIGI_CELERY_VISIBILITY_TIMEOUT: "43200"',
     'LUIGI_CELERY_VISIBILITY_TIMEOUT: "12h"', "LUIGI_CELERY_VISIBILITY_TIMEOUT='12h'"),
    ("real-looking secret", settings_problems, SECRET_FILE, "ops:REPLACE_ME_FLOWER_PASSWORD", "ops:hunter2",
     "FLOWER_BASIC_AUTH is not marked"),
    ("visibility timeout too short", settings_problems, CONFIGMAP_FILE, 'LUIGI_CELERY_VISIBILITY_TIMEOUT: "43200"',
     'LUIGI_CELERY_VISIBILITY_TIMEOUT: "1800"', "must outlast"),
    ("short grace period", worker_problems, WORKER_FILE, "terminationGracePeriodSeconds: 3600",
     "terminationGracePeriodSeconds: 300", "terminationGracePeriodSeconds 300"),
    ("no limits", worker_problems, WORKER_FILE, 'limits:\n              cpu: "3"\n              memory: 2Gi',
     "limits: {}", "resources.limits lacks"),
    ("liveness probe not the check", worker_problems, WORKER_FILE,
     "livenessProbe:\n            exec:\n              command: [\"sh\", \"-c\", 'exec luigi-celery check",
     "livenessProbe:\n            exec:\n              command: [\"sh\", \"-c\", 'exec celery inspect",
     "livenessProbe does not run"),
    ("root allowed", worker_problems, WORKER_FILE, "runAsNonRoot: true", "runAsNonRoot: false", "runAsNonRoot"),
    ("scrape annotation on another port", worker_problems, WORKER_FILE, 'prometheus.io/port: "9541"',
     'prometheus.io/port: "9540"', "scrape annotations"),
    ("metrics on the pod's loopback", worker_problems, CONFIGMAP_FILE, 'LUIGI_CELERY_METRICS_ADDRESS: "0.0.0.0"',
     'LUIGI_CELERY_METRICS_ADDRESS: "127.0.0.1"', "metrics address '127.0.0.1'"),
    ("concurrency beside the CPU request", worker_problems, WORKER_FILE, '- --concurrency\n            - "2"',
     '- --concurrency\n            - "8"', "--concurrency 8"),
    ("Job runs no dispatcher", job_and_flower_problems, JOB_FILE, "- luigi-celery\n            - run",
     "- luigi\n            - run", "luigi-celery run"),
    ("Flower password literal", job_and_flower_problems, FLOWER_FILE,
     "valueFrom:\n                secretKeyRef:\n                  name: luigi-celery-flower\n"
     "                  key: FLOWER_BASIC_AUTH",
     'value: "ops:secret"', "FLOWER_BASIC_AUTH must come from a secretKeyRef"),
    ("Flower probe elsewhere", job_and_flower_problems, FLOWER_FILE, "path: /healthcheck", "path: /", "/healthcheck"),
    ("scheduler readiness on every replica", scheduler_problems, SCHEDULER_FILE, "path: /readyz",
     "path: /healthz", "readinessProbe is not GET /readyz"),
    ("scheduler liveness on the leader only", scheduler_problems, SCHEDULER_FILE,
     "livenessProbe:\n            httpGet:\n              path: /healthz",
     "livenessProbe:\n            httpGet:\n              path: /readyz", "livenessProbe is not GET /healthz"),
    ("scheduler startup probe on /readyz", scheduler_problems, SCHEDULER_FILE,
     "startupProbe:\n            httpGet:\n              path: /healthz",
     "startupProbe:\n            httpGet:\n              path: /readyz", "startupProbe on /readyz"),
    ("scheduler Service selects every pod", scheduler_problems, SCHEDULER_FILE,
     "    app.kubernetes.io/name: luigi-celery\n    app.kubernetes.io/component: scheduler\n  ports:",
     "    app.kubernetes.io/name: luigi-celery\n  ports:", "not the scheduler's pods alone"),
    ("scheduler Service selects the workers", scheduler_problems, SCHEDULER_FILE,
     "    app.kubernetes.io/component: scheduler\n  ports:", "    app.kubernetes.io/component: worker\n  ports:",
     "not the scheduler's pods alone"),
    ("scheduler Service routes to standbys", scheduler_problems, SCHEDULER_FILE, "  type: ClusterIP",
     "  type: ClusterIP\n  publishNotReadyAddresses: true", "publishNotReadyAddresses"),
    ("scheduler Service on another port", scheduler_problems, SCHEDULER_FILE, "      port: 8082", "      port: 80",
     "port 8082 does not reach"),
    ("one scheduler replica", scheduler_problems, SCHEDULER_FILE, "replicas: 2", "replicas: 1", "replicas 1"),
    ("scheduler rollout waits for a ready standby", scheduler_problems, SCHEDULER_FILE, "maxUnavailable: 100%",
     "maxUnavailable: 1", "the rollout would never end"),
    ("scheduler state URL on the command line", scheduler_problems, SCHEDULER_FILE, '"--port", "8082"]',
     '"--port", "8082", "--state-url", "redis://:pw@redis:6379/1"]', "the state URL on the command line"),
    ("scheduler without limits", scheduler_problems, SCHEDULER_FILE,
     'limits:\n              cpu: "1"\n              memory: 1Gi', "limits: {}", "resources.limits lacks"),
    ("scheduler as root", scheduler_problems, SCHEDULER_FILE, "runAsNonRoot: true", "runAsNonRoot: false",
     "runAsNonRoot"),
    ("scheduler state URL not Redis", settings_problems, SECRET_FILE, 'LUIGI_CELERY_SCHEDULER_STATE_URL: "redis://',
     'LUIGI_CELERY_SCHEDULER_STATE_URL: "http://', "LUIGI_CELERY_SCHEDULER_STATE_URL='http://:REPLACE_ME"),
    ("HPA on another metric", metric_problems, "hpa.yaml", "name: luigi_celery_queue_depth",
     "name: luigi_celery_queue_length", "'luigi_celery_queue_length'"),
    ("Prometheus query on another metric", metric_problems, "keda-scaledobject-prometheus.yaml",
     "max(luigi_celery_queue_depth{", "max(luigi_celery_queue_size{", "does not read"),
    ("KEDA on another queue", metric_problems, "keda-scaledobject-redis.yaml", "listName: luigi",
     "listName: celery", "listName 'celery'"),
    ("two autoscalers", kustomization_problems, KUSTOMIZATION, "  - keda-scaledobject-redis.yaml\n",
     "  - keda-scaledobject-redis.yaml\n  - hpa.yaml\n", "exactly one autoscaler"),
    ("missing resource", kustomization_problems, KUSTOMIZATION, "  - flower.yaml", "  - flowers.yaml",
     "flowers.yaml does not exist"),
    ("undocumented file", kustomization_problems, KUSTOMIZATION, "#   hpa.yaml", "#   an-hpa", "hpa.yaml is neither"),
    ("base not self-contained", kustomization_problems, KUSTOMIZATION, "  - secret.yaml\n", "",
     "in the base alone"),
]  # fmt: skip


@pytest.mark.parametrize(
    "check, file, old, new, expected", [case[1:] for case in BROKEN_COPIES], ids=[case[0] for case in BROKEN_COPIES]
)
def test_each_check_catches_a_broken_copy(tmp_path, check, file, old, new, expected):
    # Given a copy of the manifests with one mistake
    copy = tmp_path / "kubernetes"
    shutil.copytree(MANIFESTS, copy)
    text = (copy / file).read_text()
    assert old in text, f"the mutation no longer applies to {file}: {old!r}"
    (copy / file).write_text(text.replace(old, new, 1))
    # Then the check that guards it reports that very mistake
    problems = check(copy)
    assert any(expected in p for p in problems), problems
