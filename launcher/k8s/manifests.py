"""Kubernetes objects for a training run and for the data-prep stages, as plain dicts.

Training (any cluster, no operator):

- ``ConfigMap`` ``{name}-config``: the resolved run config, mounted at ``/etc/elcrec/config.yaml``.
- ``Service`` ``{name}``: headless (``clusterIP: None``, ``publishNotReadyAddresses``), the
  ``subdomain`` of the Job's pods, so pod ``i`` is ``{name}-{i}.{name}`` in DNS before it is ready.
- ``Job`` ``{name}``: Indexed, ``completions = parallelism = nodes``; every pod runs
  ``python -m launcher.entrypoint``, which turns ``JOB_COMPLETION_INDEX`` and the ``ELCREC_*``
  variables below into node rank, node count and master ``{name}-0.{name}``.
  ``podFailurePolicy``: exit 2 (permanent) fails the Job, a disruption (preemption, eviction,
  node drain) is retried without counting, exit 75 (retryable) is retried and counted against
  ``backoffLimit = nodes x retries`` (one gang failure costs up to ``nodes`` pod failures).
- ``Deployment`` ``{name}-tensorboard``: TensorBoard on ``RUN/tb``, port 6006 inside the pod.

Kubeflow variants, with the same pod template in place of the Job and Service:

- ``PyTorchJob`` (``kubeflow.org/v1``, the training operator's legacy API): Master + Workers,
  ``nprocPerNode``; the operator's ``PET_*`` variables feed the same entrypoint.
- ``TrainJob`` + ``TrainingRuntime`` ``{name}`` (Kubeflow Trainer v2, ``trainer.kubeflow.org``):
  the runtime holds a JobSet template (one replicated Job ``node``, container ``node``, the same
  ``podFailurePolicy``; the JobSet fails at once on exit 2 and restarts the gang otherwise, up to
  ``retries``); the TrainJob names it and sets the node and process counts. The Trainer's torch
  plugin sets ``PET_*`` (master ``{name}-node-0-0.{name}``, port 29400) for the entrypoint.

Around every variant:

- ``NetworkPolicy`` ``{name}-trainer``: trainer pods accept traffic only from the job's own
  trainer pods (the rendezvous port and the collectives' other ports alike);
  ``{name}-tensorboard``: TensorBoard accepts none. TensorBoard listens on 127.0.0.1 only and has
  no Service: ``kubectl port-forward`` reaches it (it connects inside the pod), nothing else does.
- TensorBoard gets its own, read-only storage Secret and ServiceAccount, never the trainer's.
- Images are referenced by digest (``name@sha256:...``); a tag is refused unless allowed, since
  every pod and every retry pulls on its own and a tag that moves mixes code within one run.
- ``--queue`` labels the workload ``kueue.x-k8s.io/queue-name`` (Kueue's webhook suspends it until
  admitted); ``--priority-class`` sets the pods' ``priorityClassName``.

Data prep (``python -m data_prep.build --stage ...``), one Job per stage, run in this order:
``plan`` (one pod), ``map``, ``reduce`` (Indexed Jobs, one pod per worker index,
``--worker-index $(JOB_COMPLETION_INDEX)``, each index retried on its own), ``kcore`` (one pod),
``write`` (Indexed, one pod per group of shards) and ``commit`` (one pod; the dataset's manifest
is written last). Every unit of work leaves a done marker, so a rerun resumes.

Locations are ``s3://bucket/path`` (credentials from the Secret, optional, or the pod's cloud
identity through ``serviceAccountName``) or ``pvc://CLAIM/path`` (the claim mounted at
``/mnt/pvc/CLAIM``; ReadWriteMany when several nodes or TensorBoard share it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from elcrec_dist.config import ConfigError

Obj = dict[str, Any]

CONFIG_DIR = "/etc/elcrec"
PREP_CONFIG_DIR = "/etc/elcrec-prep"
PVC_ROOT = "/mnt/pvc"
RUN_AS = 10001  # the image's non-root user (k8s/Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"
TENSORBOARD_PORT = 6006
TRAINJOB_PORT = 29400  # the Trainer's torch plugin fixes PET_MASTER_PORT (ContainerTrainerPort)
TRAINJOB_NODE = "node"  # replicated Job and container the Trainer fills in (constants.Node)
TRAINJOB_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
EXIT_PERMANENT = 2
EXIT_RETRYABLE = 75
NAME_MAX = 40  # "{name}-prep-reduce-{index}" must stay a valid 63-character hostname
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")
_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class ManifestError(ConfigError):
    """A render option is wrong (name, location, quantity...). Permanent: exit 2."""


# --- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Location:
    """Where data or a run folder lives, as the pod sees it."""

    path: str  # the value the program gets (s3://... or /mnt/pvc/CLAIM/...)
    claim: str | None = None  # PVC to mount, if any

    @property
    def volume_name(self) -> str:
        return f"pvc-{self.claim}"

    @property
    def mount_path(self) -> str:
        return f"{PVC_ROOT}/{self.claim}"


def parse_location(text: str, *, what: str) -> Location:
    """``s3://bucket/key`` or ``pvc://CLAIM/path``; anything else cannot be shared by pods."""
    text = text.strip()
    if text.startswith("s3://"):
        if len(text) <= len("s3://") or text[len("s3://")] == "/":
            raise ManifestError(f"{what}: {text!r} names no bucket")
        return Location(path=text)
    if text.startswith("pvc://"):
        claim, _, rest = text[len("pvc://"):].partition("/")
        if not _NAME.match(claim) or len(claim) > 63:
            raise ManifestError(
                f"{what}: {claim!r} in {text!r} is not a valid PersistentVolumeClaim name"
            )
        rest = rest.strip("/")
        path = f"{PVC_ROOT}/{claim}" + (f"/{rest}" if rest else "")
        return Location(path=path, claim=claim)
    raise ManifestError(
        f"{what}: {text!r} is neither s3://BUCKET/PATH nor pvc://CLAIM/PATH "
        "(a path inside one pod is not visible to the others)"
    )


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str | None = None
    effect: str | None = None

    def to_obj(self) -> Obj:
        obj: Obj = {"key": self.key, "operator": "Equal" if self.value is not None else "Exists"}
        if self.value is not None:
            obj["value"] = self.value
        if self.effect:
            obj["effect"] = self.effect
        return obj


def parse_toleration(text: str) -> Toleration:
    """``key``, ``key=value``, ``key:Effect`` or ``key=value:Effect``."""
    body, _, effect = text.partition(":")
    key, sep, value = body.partition("=")
    if not key.strip():
        raise ManifestError(f"--toleration {text!r}: no key")
    if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ManifestError(
            f"--toleration {text!r}: effect must be NoSchedule, PreferNoSchedule or NoExecute"
        )
    return Toleration(key=key.strip(), value=value.strip() if sep else None, effect=effect or None)


def parse_key_value(text: str, *, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ManifestError(f"{what}: expected key=value, got {text!r}")
    return key.strip(), value.strip()


def check_name(name: str) -> str:
    if not _NAME.match(name) or len(name) > NAME_MAX:
        raise ManifestError(
            f"name {name!r} must be lowercase letters, digits and '-', start with a letter, end "
            f"with a letter or digit, at most {NAME_MAX} characters"
        )
    return name


def default_name(config_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", config_name.lower()).strip("-") or "run"
    return check_name(f"elcrec-{slug}"[:NAME_MAX].rstrip("-"))


def check_quantity(text: str | None, *, what: str) -> str | None:
    if text is not None and not _QUANTITY.match(text):
        raise ManifestError(f"{what}: {text!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return text


def image_is_pinned(image: str) -> bool:
    """``name@sha256:<64 hex>`` (a tag before the digest is allowed; the kubelet ignores it)."""
    return bool(_DIGEST.search(image))


def check_image(image: str, *, allow_mutable: bool) -> str:
    """A digest-pinned reference, or a tag only when ``allow_mutable``. Why refuse by default:
    every pod of a gang and every retry pulls the image on its own, so a tag moved between two
    pulls runs two builds of the trainer in one job or across a resume, which neither the resume
    checks nor the exactness tests can see."""
    if not image or any(c.isspace() for c in image):
        raise ManifestError(f"--image {image!r} is not an image reference")
    if "@" in image and not image_is_pinned(image):
        raise ManifestError(f"--image {image!r}: a digest is written @sha256:<64 lowercase hex>")
    if not image_is_pinned(image) and not allow_mutable:
        raise ManifestError(
            f"--image {image!r} is a tag, which can move between the pulls of one job's pods and "
            "retries: give the digest (REPO@sha256:..., printed by `docker push` or `docker "
            "buildx imagetools inspect REPO:TAG`), or pass --allow-mutable-image to accept the tag"
        )
    return image


def mutable_image_warning(image: str) -> str | None:
    if image_is_pinned(image):
        return None
    return (f"warning: --image {image} is a tag, not a digest: pods and retries of this job may "
            "run different builds if the tag moves")


@dataclass(frozen=True)
class PodOptions:
    """Scheduling, identity and storage settings shared by every pod of a run."""

    image: str
    namespace: str | None = None
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    s3_secret: str = "elcrec-s3"  # optional: absent means "use the pod's cloud identity"
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    allow_mutable_image: bool = False
    queue: str | None = None  # Kueue LocalQueue: labels the workload (Job, PyTorchJob, TrainJob)
    priority_class: str | None = None  # PriorityClass of the workload's pods

    def __post_init__(self) -> None:
        check_image(self.image, allow_mutable=self.allow_mutable_image)
        if self.queue is not None and not _LABEL_VALUE.match(self.queue):
            raise ManifestError(f"--queue {self.queue!r} is not a valid label value (a LocalQueue "
                                "name: at most 63 letters, digits, '-', '_' or '.')")
        if self.priority_class is not None and not _SUBDOMAIN.match(self.priority_class):
            raise ManifestError(f"--priority-class {self.priority_class!r} is not a valid "
                                "PriorityClass name (lowercase letters, digits, '-' and '.')")

    def workload_labels(self) -> dict[str, str]:
        """Labels of the object a queue admits (never of its pods: Kueue reads the workload)."""
        return {KUEUE_QUEUE_LABEL: self.queue} if self.queue else {}


@dataclass(frozen=True)
class TrainSpec:
    name: str
    config_yaml: str
    nodes: int
    gpus_per_node: int
    data: Location
    run_dir: Location
    pod: PodOptions
    procs_per_node: int | None = None  # defaults to gpus_per_node
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "16Gi"
    scratch_size: str = "20Gi"
    master_port: int = 29500
    retries: int = 3
    # Seconds between SIGTERM and SIGKILL for a trainer pod: every rank checkpoints at its next
    # step and uploads it (docs/RELIABILITY.md), which Kubernetes' default of 30 s may not cover.
    grace_period_s: int = 300
    train_args: tuple[str, ...] = ()
    tensorboard: bool = True
    # TensorBoard only reads the run folder: its own read-only credentials, never the trainer's.
    tensorboard_secret: str = "elcrec-s3-readonly"  # optional Secret; '' for none
    tensorboard_service_account: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.tensorboard_secret and self.tensorboard_secret == self.pod.s3_secret:
            raise ManifestError(
                f"--tensorboard-s3-secret {self.tensorboard_secret!r} is the trainer's Secret: "
                "TensorBoard would get write access to the run folder; give it a read-only one"
            )
        if (self.tensorboard_service_account is not None
                and self.tensorboard_service_account == self.pod.service_account):
            raise ManifestError(
                f"--tensorboard-service-account {self.tensorboard_service_account!r} is the "
                "trainer's ServiceAccount (its cloud identity can write the run folder); give "
                "TensorBoard a read-only one"
            )
        if self.nodes < 1:
            raise ManifestError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ManifestError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node is None and self.gpus_per_node == 0:
            raise ManifestError(
                "--gpus-per-node 0 needs --procs-per-node (how many CPU ranks per pod)"
            )
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise ManifestError(f"--procs-per-node must be >= 1, got {self.procs_per_node}")
        if self.retries < 0:
            raise ManifestError(f"--retries must be >= 0, got {self.retries}")
        if self.grace_period_s < 1:
            raise ManifestError(f"--grace-period must be >= 1 s, got {self.grace_period_s}")
        if not 0 < self.master_port < 65536:
            raise ManifestError(f"--master-port {self.master_port} is not a TCP port")
        check_quantity(self.cpu, what="--cpu")
        check_quantity(self.memory, what="--memory")
        check_quantity(self.shm_size, what="--shm-size")
        check_quantity(self.scratch_size, what="--scratch-size")

    @property
    def procs(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    @property
    def tensorboard_name(self) -> str:
        return f"{self.name}-tensorboard"


@dataclass(frozen=True)
class PrepSpec:
    name: str
    input: str  # glob or URL, as data_prep.build takes it (pvc:// is rewritten to the mount)
    output: Location
    map_workers: int
    reduce_workers: int
    pod: PodOptions
    write_workers: int = 1
    input_claim: str | None = None
    parallelism: int | None = None  # pods at once per stage (default: all)
    prep_config_yaml: str | None = None
    cpu: str | None = "2"
    memory: str | None = "8Gi"
    scratch_size: str = "50Gi"
    retries_per_index: int = 2
    prep_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_name(self.name)
        for flag, value in (
            ("--map-workers", self.map_workers),
            ("--reduce-workers", self.reduce_workers),
            ("--write-workers", self.write_workers),
        ):
            if value < 1:
                raise ManifestError(f"{flag} must be >= 1, got {value}")
        if self.parallelism is not None and self.parallelism < 1:
            raise ManifestError(f"--parallelism must be >= 1, got {self.parallelism}")
        if self.retries_per_index < 0:
            raise ManifestError(f"--retries must be >= 0, got {self.retries_per_index}")
        check_quantity(self.cpu, what="--cpu")
        check_quantity(self.memory, what="--memory")
        check_quantity(self.scratch_size, what="--scratch-size")

    @property
    def config_map(self) -> str:
        return f"{self.name}-prep-config"

    def job_name(self, stage: str) -> str:
        return f"{self.name}-prep-{stage}"

    def workers(self, stage: str) -> int | None:
        """Worker count of an indexed stage; None for the one-pod stages."""
        return {
            "map": self.map_workers,
            "reduce": self.reduce_workers,
            "write": self.write_workers,
        }.get(stage)


def parse_prep_input(text: str) -> tuple[str, str | None]:
    """The input glob as the pod sees it, and the claim to mount read-only (if any)."""
    if text.startswith("pvc://"):
        loc = parse_location(text, what="--input")
        return loc.path, loc.claim
    if "://" in text and not text.startswith("s3://"):
        raise ManifestError(
            f"--input: {text!r}: only s3:// and pvc:// inputs are visible to every pod"
        )
    if "://" not in text:
        raise ManifestError(
            f"--input: {text!r} is a local path; use s3://BUCKET/GLOB or pvc://CLAIM/GLOB"
        )
    return text, None


# --- shared pieces --------------------------------------------------------------------------------

def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "elcrec",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def _meta(name: str, *, instance: str, component: str, pod: PodOptions,
          workload: bool = False) -> Obj:
    """``workload``: the object a queue admits (gets the Kueue queue label)."""
    meta: Obj = {"name": name}
    if pod.namespace:
        meta["namespace"] = pod.namespace
    meta["labels"] = labels(instance, component) | (pod.workload_labels() if workload else {})
    return meta


def container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def pod_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _base_env() -> list[Obj]:
    # The root filesystem is read-only: caches (DeepSpeed's op builds, Triton) go to /tmp.
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _pod_spec(pod: PodOptions, containers: list[Obj], volumes: list[Obj], *, restart: str,
              gpu_toleration: bool, subdomain: str | None = None,
              grace_period_s: int | None = None) -> Obj:
    spec: Obj = {}
    if subdomain:
        spec["subdomain"] = subdomain
    spec["restartPolicy"] = restart
    if grace_period_s is not None:
        spec["terminationGracePeriodSeconds"] = grace_period_s
    if pod.priority_class:
        spec["priorityClassName"] = pod.priority_class
    if pod.service_account:
        spec["serviceAccountName"] = pod.service_account
    spec["automountServiceAccountToken"] = False
    spec["securityContext"] = pod_security()
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    tolerations = [t.to_obj() for t in pod.tolerations]
    if gpu_toleration and not any(t.key == GPU_RESOURCE for t in pod.tolerations):
        tolerations.insert(0, Toleration(GPU_RESOURCE, None, "NoSchedule").to_obj())
    if tolerations:
        spec["tolerations"] = tolerations
    if pod.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in pod.image_pull_secrets]
    spec["containers"] = containers
    spec["volumes"] = volumes
    return spec


def _pvc_volumes(locations: Sequence[tuple[str | None, bool]]) -> tuple[list[Obj], list[Obj]]:
    """One volume per distinct claim; read-only only when every use is read-only."""
    read_only: dict[str, bool] = {}
    for claim, ro in locations:
        if claim is not None:
            read_only[claim] = read_only.get(claim, True) and ro
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    for claim, ro in read_only.items():
        loc = Location(path="", claim=claim)
        volumes.append(
            {"name": loc.volume_name, "persistentVolumeClaim": {"claimName": claim, "readOnly": ro}}
        )
        mount: Obj = {"name": loc.volume_name, "mountPath": loc.mount_path}
        if ro:
            mount["readOnly"] = True
        mounts.append(mount)
    return volumes, mounts


def _env_from(pod: PodOptions) -> list[Obj]:
    return [{"secretRef": {"name": pod.s3_secret, "optional": True}}] if pod.s3_secret else []


def failure_policy(container: str) -> Obj:
    """Exit 2 fails the Job; disruptions are retried for free; exit 75 is retried and counted."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_PERMANENT],
                },
            },
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "Count",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_RETRYABLE],
                },
            },
        ]
    }


# --- training -------------------------------------------------------------------------------------

def config_map(spec: TrainSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec.config_map, instance=spec.name, component="config", pod=spec.pod),
        "data": {"config.yaml": spec.config_yaml},
    }


def headless_service(spec: TrainSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec.name, instance=spec.name, component="trainer", pod=spec.pod),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # peers must resolve pod 0 before anything is "ready"
            "selector": labels(spec.name, "trainer"),
            "ports": [
                {"name": "rendezvous", "port": spec.master_port, "targetPort": spec.master_port}
            ],
        },
    }


def trainer_container(spec: TrainSpec, *, name: str, kind: str) -> tuple[Obj, list[Obj]]:
    """The trainer's container and its pod's volumes. ``kind``: ``job`` (the Indexed Job's
    variables), ``pytorchjob`` or ``trainjob`` (the operator sets ``PET_*``)."""
    indexed = kind == "job"
    env: list[Obj] = [
        {"name": "ELCREC_PROCS_PER_NODE", "value": str(spec.procs)},
        {"name": "ELCREC_DATA", "value": spec.data.path},
        {"name": "ELCREC_RUN_DIR", "value": spec.run_dir.path},
    ]
    if indexed:
        env = [
            {"name": "ELCREC_NUM_NODES", "value": str(spec.nodes)},
            *env[:1],
            # The Job controller labels its pods with the Job's name: no name to keep in sync here.
            {
                "name": "ELCREC_JOB_NAME",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}
                },
            },
            {"name": "ELCREC_SERVICE_NAME", "value": spec.name},
            {"name": "ELCREC_MASTER_PORT", "value": str(spec.master_port)},
            *env[1:],
        ]
    env += _base_env()
    requests: Obj = {}
    limits: Obj = {}
    if spec.cpu:
        requests["cpu"] = spec.cpu
    if spec.memory:
        requests["memory"] = spec.memory
        limits["memory"] = spec.memory
    if spec.gpus_per_node:
        limits[GPU_RESOURCE] = spec.gpus_per_node
    resources: Obj = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    pvc_volumes, pvc_mounts = _pvc_volumes([(spec.data.claim, True), (spec.run_dir.claim, False)])
    container: Obj = {
        "name": name,
        "image": spec.pod.image,
        "imagePullPolicy": spec.pod.image_pull_policy,
        "command": ["python", "-m", "launcher.entrypoint"],
        "args": [
            "--", "--config", f"{CONFIG_DIR}/config.yaml",
            "--data", "$(ELCREC_DATA)", "--run-dir", "$(ELCREC_RUN_DIR)",
            # a retried pod continues from the newest complete checkpoint; a first run starts afresh
            "--resume", "auto", *spec.train_args,
        ],
        "env": env,
    }
    if spec.pod.s3_secret:
        container["envFrom"] = _env_from(spec.pod)
    # The training operator finds the master port by this name; the Trainer fixes its own.
    port_name, port = {"job": ("rendezvous", spec.master_port),
                       "pytorchjob": ("pytorchjob-port", spec.master_port),
                       "trainjob": ("rendezvous", TRAINJOB_PORT)}[kind]
    container["ports"] = [{"name": port_name, "containerPort": port}]
    if resources:
        container["resources"] = resources
    container["securityContext"] = container_security()
    container["volumeMounts"] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/tmp"},
        *pvc_mounts,
    ]
    volumes = [
        {"name": "config", "configMap": {"name": spec.config_map}},
        # NCCL and the data loader's workers pass tensors through /dev/shm; the runtime's 64 MiB
        # default is far too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": "scratch", "emptyDir": {"sizeLimit": spec.scratch_size}},
        *pvc_volumes,
    ]
    return container, volumes


def training_job(spec: TrainSpec) -> Obj:
    container, volumes = trainer_container(spec, name="trainer", kind="job")
    template = {
        "metadata": {"labels": labels(spec.name, "trainer")},
        "spec": _pod_spec(spec.pod, [container], volumes, restart="Never",
                          gpu_toleration=spec.gpus_per_node > 0, subdomain=spec.name,
                          grace_period_s=spec.grace_period_s),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(spec.name, instance=spec.name, component="trainer", pod=spec.pod,
                          workload=True),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": spec.nodes * spec.retries,
            # A replacement pod starts only once the failed one is gone: never two pods with one
            # index (and one DNS name) at a time. Required alongside podFailurePolicy.
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": failure_policy("trainer"),
            "template": template,
        },
    }


def pytorch_job(spec: TrainSpec) -> Obj:
    """Kubeflow training-operator variant. Its restartPolicy cannot tell exit 2 from 75 (the
    operator's ExitCode policy treats every code below 128 as permanent), so it restarts on any
    failure up to runPolicy.backoffLimit."""
    container, volumes = trainer_container(spec, name="pytorch", kind="pytorchjob")

    def replica(count: int) -> Obj:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": labels(spec.name, "trainer")},
                "spec": _pod_spec(spec.pod, [container], volumes, restart="OnFailure",
                                  gpu_toleration=spec.gpus_per_node > 0,
                                  grace_period_s=spec.grace_period_s),
            },
        }

    replicas: Obj = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(spec.name, instance=spec.name, component="trainer", pod=spec.pod,
                          workload=True),
        "spec": {
            "nprocPerNode": str(spec.procs),
            "runPolicy": {"backoffLimit": spec.retries, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def training_runtime(spec: TrainSpec) -> Obj:
    """The Trainer v2 runtime of this job: a JobSet template with one replicated Job ``node``.

    Namespaced (a ``TrainingRuntime``, not a ``ClusterTrainingRuntime``): it names this run's
    ConfigMap and Secret, which live in the job's namespace, and creating it needs no cluster
    rights. Failures follow the Indexed Job's exit-code contract, one level up: the child Job's
    ``podFailurePolicy`` fails it at once on exit 2 (reason ``PodFailurePolicy``), which fails the
    JobSet; any other failure fails the child Job (``backoffLimit`` 0) and the JobSet restarts
    the whole gang, at most ``retries`` times; a disrupted pod is replaced without counting."""
    container, volumes = trainer_container(spec, name=TRAINJOB_NODE, kind="trainjob")
    job_spec: Obj = {
        "completionMode": "Indexed",  # PET_NODE_RANK is the pod's completion index
        "completions": spec.nodes,  # the Trainer sets both from numNodes; written for the reader
        "parallelism": spec.nodes,
        "backoffLimit": 0,  # one lost pod stalls every rank: the JobSet restarts them together
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": failure_policy(TRAINJOB_NODE),
        "template": {
            "metadata": {"labels": labels(spec.name, "trainer")},
            "spec": _pod_spec(spec.pod, [container], volumes, restart="Never",
                              gpu_toleration=spec.gpus_per_node > 0,
                              grace_period_s=spec.grace_period_s),
        },
    }
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainingRuntime",
        "metadata": _meta(spec.name, instance=spec.name, component="trainer-runtime",
                          pod=spec.pod),
        "spec": {
            "mlPolicy": {"numNodes": spec.nodes, "torch": {}},
            "template": {
                "spec": {
                    # peers must resolve node 0 before anything is "ready"
                    "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
                    "failurePolicy": {
                        "maxRestarts": spec.retries,
                        "rules": [{"name": "permanentExit", "action": "FailJobSet",
                                   "onJobFailureReasons": ["PodFailurePolicy"]}],
                    },
                    "replicatedJobs": [{
                        "name": TRAINJOB_NODE,
                        "replicas": 1,
                        "template": {
                            # the Trainer applies the TrainJob's trainer settings to this Job
                            "metadata": {"labels": {TRAINJOB_ANCESTOR: "trainer"}},
                            "spec": job_spec,
                        },
                    }],
                },
            },
        },
    }


def train_job(spec: TrainSpec) -> Obj:
    """Kubeflow Trainer v2 variant: the TrainJob names its runtime (``training_runtime``, same
    name) and sets the node and process counts; everything else is in the runtime."""
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": _meta(spec.name, instance=spec.name, component="trainer", pod=spec.pod,
                          workload=True),
        "spec": {
            "runtimeRef": {"name": spec.name, "kind": "TrainingRuntime",
                           "apiGroup": TRAINER_API.split("/")[0]},
            "trainer": {"numNodes": spec.nodes, "numProcPerNode": spec.procs},
        },
    }


def network_policies(spec: TrainSpec) -> list[Obj]:
    """Trainer pods take traffic only from the job's own trainer pods: the rendezvous port and
    every other port (NCCL and gloo connect peers on ephemeral ones). Egress stays open (storage,
    DNS, the peers). TensorBoard takes none: ``kubectl port-forward`` enters the pod's own
    network namespace, which no NetworkPolicy filters."""
    trainer = labels(spec.name, "trainer")
    policies = [{
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{spec.name}-trainer", instance=spec.name, component="trainer",
                          pod=spec.pod),
        "spec": {
            "podSelector": {"matchLabels": trainer},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": trainer}}]}],
        },
    }]
    if spec.tensorboard:
        policies.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(spec.tensorboard_name, instance=spec.name,
                              component="tensorboard", pod=spec.pod),
            "spec": {
                "podSelector": {"matchLabels": labels(spec.name, "tensorboard")},
                "policyTypes": ["Ingress"],  # and no rule: nothing may connect
            },
        })
    return policies


def tensorboard(spec: TrainSpec) -> list[Obj]:
    name = spec.tensorboard_name
    pvc_volumes, pvc_mounts = _pvc_volumes([(spec.run_dir.claim, True)])
    container: Obj = {
        "name": "tensorboard",
        "image": spec.pod.image,
        "imagePullPolicy": spec.pod.image_pull_policy,
        "command": ["tensorboard"],
        # Loopback only: TensorBoard has no authentication. `kubectl port-forward` connects to
        # the pod's loopback, so it still works; no other pod can reach it, whatever the CNI.
        "args": ["--logdir", "$(ELCREC_RUN_DIR)/tb", "--host", "127.0.0.1",
                 "--port", str(TENSORBOARD_PORT)],
        "env": [{"name": "ELCREC_RUN_DIR", "value": spec.run_dir.path}, *_base_env()],
    }
    # Its own identity: the read-only Secret and ServiceAccount, never the trainer's.
    pod = dataclasses.replace(
        spec.pod, node_selector=(), tolerations=(),  # no GPU node needed
        s3_secret=spec.tensorboard_secret, service_account=spec.tensorboard_service_account,
        queue=None, priority_class=None,  # a viewer, not a workload to queue or preempt with
    )
    if pod.s3_secret:
        container["envFrom"] = _env_from(pod)
    container |= {
        "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}, *pvc_mounts],
    }
    volumes = [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}, *pvc_volumes]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, instance=spec.name, component="tensorboard", pod=spec.pod),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels(spec.name, "tensorboard")},
            "template": {
                "metadata": {"labels": labels(spec.name, "tensorboard")},
                "spec": _pod_spec(
                    pod, [container], volumes, restart="Always", gpu_toleration=False
                ),
            },
        },
    }
    return [deployment]


def training_objects(spec: TrainSpec, *, kind: str = "job") -> list[Obj]:
    """Everything a run needs, in the order to apply it. ``kind``: the trainer's workload,
    ``job`` (Indexed Job + headless Service), ``pytorchjob`` or ``trainjob`` (its runtime
    first: the Trainer's webhook checks that a TrainJob's runtime exists)."""
    workload = {
        "job": lambda: [headless_service(spec), training_job(spec)],
        "pytorchjob": lambda: [pytorch_job(spec)],
        "trainjob": lambda: [training_runtime(spec), train_job(spec)],
    }
    if kind not in workload:
        raise ManifestError(f"unknown workload kind {kind!r} (expected {', '.join(workload)})")
    objects = [config_map(spec), *network_policies(spec), *workload[kind]()]
    if spec.tensorboard:
        objects += tensorboard(spec)
    return objects


# --- data prep ------------------------------------------------------------------------------------

PREP_STAGES = ("plan", "map", "reduce", "kcore", "write", "commit")


def prep_config_map(spec: PrepSpec) -> Obj:
    assert spec.prep_config_yaml is not None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            spec.config_map, instance=spec.name, component="prep-config", pod=spec.pod
        ),
        "data": {"prep.yaml": spec.prep_config_yaml},
    }


def prep_job(spec: PrepSpec, stage: str) -> Obj:
    """One stage of ``python -m data_prep.build``. map, reduce and write: an Indexed Job, one pod
    per worker index, each index retried on its own; plan, kcore and commit: one pod."""
    if stage not in PREP_STAGES:
        raise ManifestError(f"unknown prep stage {stage!r} (expected {', '.join(PREP_STAGES)})")
    workers = spec.workers(stage)
    args = ["--stage", stage]
    if workers is not None:
        args += ["--worker-index", "$(JOB_COMPLETION_INDEX)", "--num-workers", str(workers)]
    args += ["--input", "$(ELCREC_PREP_INPUT)", "--output", "$(ELCREC_PREP_OUTPUT)"]
    if spec.prep_config_yaml is not None:
        args += ["--config", f"{PREP_CONFIG_DIR}/prep.yaml"]
    args += list(spec.prep_args)
    pvc_volumes, pvc_mounts = _pvc_volumes([(spec.input_claim, True), (spec.output.claim, False)])
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v}
    container: Obj = {
        "name": "prep",
        "image": spec.pod.image,
        "imagePullPolicy": spec.pod.image_pull_policy,
        "command": ["python", "-m", "data_prep.build"],
        "args": args,
        "env": [
            {"name": "ELCREC_PREP_INPUT", "value": spec.input},
            {"name": "ELCREC_PREP_OUTPUT", "value": spec.output.path},
            *_base_env(),
        ],
    }
    if spec.pod.s3_secret:
        container["envFrom"] = _env_from(spec.pod)
    resources: Obj = {}
    if requests:
        resources["requests"] = requests
    if spec.memory:
        resources["limits"] = {"memory": spec.memory}
    if resources:
        container["resources"] = resources
    mounts: list[Obj] = [{"name": "scratch", "mountPath": "/tmp"}, *pvc_mounts]
    volumes: list[Obj] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": spec.scratch_size}},
        *pvc_volumes,
    ]
    if spec.prep_config_yaml is not None:
        mounts.insert(0, {"name": "config", "mountPath": PREP_CONFIG_DIR, "readOnly": True})
        volumes.insert(0, {"name": "config", "configMap": {"name": spec.config_map}})
    container["securityContext"] = container_security()
    container["volumeMounts"] = mounts
    name = spec.job_name(stage)
    job_spec: Obj = {}
    if workers is None:
        job_spec |= {"completions": 1, "parallelism": 1, "backoffLimit": spec.retries_per_index}
    else:
        parallel = min(workers, spec.parallelism) if spec.parallelism else workers
        job_spec |= {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": parallel,
            # Workers are independent: a worker that keeps failing is retried on its own.
            "backoffLimitPerIndex": spec.retries_per_index,
        }
    job_spec |= {
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": failure_policy("prep"),
        "template": {
            "metadata": {"labels": labels(spec.name, f"prep-{stage}")},
            "spec": _pod_spec(
                spec.pod, [container], volumes, restart="Never", gpu_toleration=False
            ),
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, instance=spec.name, component=f"prep-{stage}", pod=spec.pod,
                          workload=True),
        "spec": job_spec,
    }


def prep_objects(spec: PrepSpec, stages: Sequence[str] = PREP_STAGES) -> list[Obj]:
    objects = [prep_config_map(spec)] if spec.prep_config_yaml is not None else []
    return objects + [prep_job(spec, stage) for stage in stages]
