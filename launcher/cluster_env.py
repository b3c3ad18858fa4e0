"""Where a pod sits in a multi-node job, read from whichever scheduler started it.

Every node (pod) of a training job runs the same entrypoint; this module turns the environment
the scheduler gave that pod into one :class:`ClusterSpec` (node rank, node count, processes per
node, master address and port). The launcher then starts the local ranks, and every training
process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

Sources, chosen by the variables present (or forced with ``ELCREC_CLUSTER_ENV``):

``indexed-job`` (plain Kubernetes Indexed Job + headless Service; ``JOB_COMPLETION_INDEX``)
    node rank   ``JOB_COMPLETION_INDEX`` (set by the Job controller)
    node count  ``ELCREC_NUM_NODES`` (the manifest passes the Job's ``completions``)
    master      ``ELCREC_MASTER_ADDR``, else ``{ELCREC_JOB_NAME}-0.{ELCREC_SERVICE_NAME}``: pod 0's
                DNS name, since an Indexed Job's pods are named ``{job}-{index}`` and the
                headless Service is their ``subdomain``
    port        ``ELCREC_MASTER_PORT``, else 29500

``pytorchjob`` (Kubeflow training operator's PyTorchJob, or Kubeflow Trainer v2's TrainJob,
whose torch plugin sets the same ``PET_*``; any ``PET_*`` variable)
    node count  ``PET_NNODES`` (an elastic range such as ``1:4`` is refused), else ``WORLD_SIZE``
                (operators older than ``PET_NNODES`` count pods there)
    node rank   ``PET_NODE_RANK``, else ``RANK`` (the operator sets both to the pod's index)
    master      ``PET_MASTER_ADDR``, else ``MASTER_ADDR``; port ``PET_MASTER_PORT``, else
                ``MASTER_PORT``
    processes   ``PET_NPROC_PER_NODE`` when it is a number
    ``WORLD_SIZE`` from the operator counts pods (older operators) or pods x processes (newer
    ones); any other value contradicts ``PET_NNODES``.

``volcano`` (Volcano ``batch.volcano.sh`` Job; ``VK_TASK_INDEX`` / ``VC_TASK_INDEX``)
    with the ``pytorch`` plugin: ``RANK`` (pod rank, master 0), ``WORLD_SIZE`` (pods),
    ``MASTER_ADDR``, ``MASTER_PORT``;
    with only the ``svc`` plugin: the task index, the task's host list ``VC_{TASK}_HOSTS``
    (node count = its length, master = its first host; ``ELCREC_VOLCANO_TASK`` names the task
    when the job has several) and ``ELCREC_MASTER_PORT`` (else 29500).

Common to all: processes per node come from ``ELCREC_PROCS_PER_NODE``, else the source (above),
else the number of visible CUDA devices; ``ELCREC_NUM_NODES``, when set, must agree with the
source. ``ELCREC_HOST_ALIASES="name=addr,..."`` maps host names without touching /etc/hosts
(what a pod's ``hostAliases`` would do; the two-"pod" test maps pod 0's DNS name to 127.0.0.1).

Missing, malformed or contradictory variables raise :class:`ClusterEnvError`, a
:class:`~elcrec_dist.config.ConfigError`, so entry points exit with the permanent code (2).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from elcrec_dist.config import ConfigError

DEFAULT_MASTER_PORT = 29500
SOURCES = ("indexed-job", "pytorchjob", "volcano")

# Variables whose presence says which scheduler started the pod.
_MARKERS: dict[str, tuple[str, ...]] = {
    "indexed-job": ("JOB_COMPLETION_INDEX",),
    "pytorchjob": (
        "PET_NNODES",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
        "PET_NPROC_PER_NODE",
    ),
    "volcano": ("VK_TASK_INDEX", "VC_TASK_INDEX"),
}
_T = TypeVar("_T")
_VOLCANO_HOSTS = re.compile(r"^VC_(?P<task>[A-Z0-9_]+)_HOSTS$")


class ClusterEnvError(ConfigError):
    """The pod's environment does not say where it sits in the job. Permanent (exit 2)."""


class MasterUnreachable(ConnectionError):
    """The master's name did not resolve in time. Retryable (exit 75): DNS may lag a new pod."""


@dataclass(frozen=True)
class ClusterSpec:
    """One pod's place in the job. Ranks are laid out node-major: node r holds global ranks
    ``r * procs_per_node ... (r + 1) * procs_per_node - 1``."""

    source: str
    node_rank: int
    num_nodes: int
    procs_per_node: int
    master_addr: str
    master_port: int
    master_name: str  # the name before ELCREC_HOST_ALIASES was applied (equal when not aliased)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.procs_per_node:
            raise ValueError(f"local rank {local_rank} outside [0, {self.procs_per_node})")
        return self.node_rank * self.procs_per_node + local_rank

    def rank_env(self, local_rank: int) -> dict[str, str]:
        """The variables ``elcrec_dist.distributed.init`` reads, for one local process."""
        return {
            "RANK": str(self.global_rank(local_rank)),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def hostfile(self) -> str:
        """A DeepSpeed hostfile in node-rank order. With ``--no_ssh`` the names are never
        contacted; the file only tells the launcher how many slots each node has."""
        return "".join(f"node-{i} slots={self.procs_per_node}\n" for i in range(self.num_nodes))


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def detect(
    env: Mapping[str, str], *, device_count: Callable[[], int] = cuda_device_count
) -> ClusterSpec:
    """Read the pod's :class:`ClusterSpec` from ``env`` (normally ``os.environ``)."""
    source = _choose_source(env)
    if source == "indexed-job":
        node_rank, num_nodes, master, port, procs = _indexed_job(env)
    elif source == "pytorchjob":
        node_rank, num_nodes, master, port, procs = _pytorchjob(env)
    else:
        node_rank, num_nodes, master, port, procs = _volcano(env)

    explicit_nodes = _opt_int(env, "ELCREC_NUM_NODES", minimum=1)
    if explicit_nodes is not None and explicit_nodes != num_nodes:
        raise ClusterEnvError(
            f"contradictory node count: ELCREC_NUM_NODES={explicit_nodes} but the {source} "
            f"environment says {num_nodes}"
        )
    if num_nodes < 1:
        raise ClusterEnvError(f"node count must be >= 1, got {num_nodes} ({source})")
    if not 0 <= node_rank < num_nodes:
        raise ClusterEnvError(f"node rank {node_rank} is outside [0, {num_nodes}) ({source})")
    if not 0 < port < 65536:
        raise ClusterEnvError(f"master port {port} is not a TCP port ({source})")

    explicit_procs = _opt_int(env, "ELCREC_PROCS_PER_NODE", minimum=1)
    if explicit_procs is not None and procs is not None and explicit_procs != procs:
        raise ClusterEnvError(
            f"contradictory processes per node: ELCREC_PROCS_PER_NODE={explicit_procs} but the "
            f"{source} environment says {procs}"
        )
    procs = explicit_procs if explicit_procs is not None else procs
    if procs is None:
        procs = device_count()
        if procs < 1:
            raise ClusterEnvError(
                "cannot tell how many processes to start on this node: set ELCREC_PROCS_PER_NODE "
                "(no CUDA device is visible to count)"
            )
    if source == "pytorchjob":
        _check_pytorchjob_world_size(env, num_nodes, procs)

    aliases = parse_host_aliases(env.get("ELCREC_HOST_ALIASES", ""))
    return ClusterSpec(
        source=source, node_rank=node_rank, num_nodes=num_nodes, procs_per_node=procs,
        master_addr=aliases.get(master, master), master_port=port, master_name=master,
    )


def parse_host_aliases(text: str) -> dict[str, str]:
    """``"a.b=10.0.0.1, c=127.0.0.1"`` -> ``{"a.b": "10.0.0.1", "c": "127.0.0.1"}``."""
    aliases: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, addr = item.partition("=")
        if not sep or not name.strip() or not addr.strip():
            raise ClusterEnvError(f"ELCREC_HOST_ALIASES: expected name=address, got {item!r}")
        aliases[name.strip()] = addr.strip()
    return aliases


def wait_for_master(spec: ClusterSpec, *, timeout_s: float, interval_s: float = 2.0,
                    resolve: Callable[[str], object] | None = None) -> None:
    """Block until the master's name resolves. A new pod's DNS record can lag its start; a name
    that never resolves is retryable (the master pod may be rescheduling)."""
    resolve = resolve or (lambda host: socket.getaddrinfo(host, None))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resolve(spec.master_addr)
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise MasterUnreachable(
                    f"master address {spec.master_addr!r} did not resolve within "
                    f"{timeout_s:g} s: {exc}"
                ) from exc
        time.sleep(interval_s)


# --- sources -------------------------------------------------------------------------------------

def _choose_source(env: Mapping[str, str]) -> str:
    forced = env.get("ELCREC_CLUSTER_ENV", "").strip()
    if forced:
        if forced not in SOURCES:
            raise ClusterEnvError(
                f"ELCREC_CLUSTER_ENV={forced!r}: expected one of {', '.join(SOURCES)}"
            )
        return forced
    found = {src: [v for v in names if v in env] for src, names in _MARKERS.items()}
    found = {src: names for src, names in found.items() if names}
    if not found:
        raise ClusterEnvError(
            "no cluster environment found: expected JOB_COMPLETION_INDEX (Kubernetes Indexed Job), "
            "PET_NNODES/PET_NODE_RANK (Kubeflow PyTorchJob) or VK_TASK_INDEX (Volcano Job)"
        )
    if len(found) > 1:
        listing = "; ".join(f"{src}: {', '.join(names)}" for src, names in found.items())
        raise ClusterEnvError(
            "contradictory cluster environment, variables of several schedulers are set "
            f"({listing}); "
            "set ELCREC_CLUSTER_ENV to the one that started this pod"
        )
    return next(iter(found))


# node rank, nodes, master, port, procs (None: not said)
_Mapped = tuple[int, int, str, int, int | None]


def _indexed_job(env: Mapping[str, str]) -> _Mapped:
    node_rank = _req_int(env, "JOB_COMPLETION_INDEX", minimum=0, why="the Indexed Job's pod index")
    num_nodes = _req_int(env, "ELCREC_NUM_NODES", minimum=1, why="the Job's completions")
    master = env.get("ELCREC_MASTER_ADDR", "").strip()
    if not master:
        job = _req(env, "ELCREC_JOB_NAME", why="to name pod 0 (or set ELCREC_MASTER_ADDR)")
        service = _req(
            env, "ELCREC_SERVICE_NAME", why="the headless Service (or set ELCREC_MASTER_ADDR)"
        )
        master = f"{job}-0.{service}"
    port = _opt_int(env, "ELCREC_MASTER_PORT", minimum=1)
    return node_rank, num_nodes, master, port if port is not None else DEFAULT_MASTER_PORT, None


def _pytorchjob(env: Mapping[str, str]) -> _Mapped:
    nnodes_var = "PET_NNODES"
    nnodes_text = env.get(nnodes_var, "").strip()
    if not nnodes_text:
        # Operators before PET_NNODES existed set WORLD_SIZE to the number of pods.
        nnodes_var = "WORLD_SIZE"
        nnodes_text = _req(env, nnodes_var, why="the PyTorchJob's node count: set PET_NNODES")
    if ":" in nnodes_text:
        raise ClusterEnvError(
            f"{nnodes_var}={nnodes_text!r} is an elastic range; "
            "elastic PyTorchJobs are not supported "
            "(drop elasticPolicy so the operator sets a fixed node count)"
        )
    num_nodes = _as_int(nnodes_var, nnodes_text, minimum=1)
    node_rank = _agreeing_int(env, ("PET_NODE_RANK", "RANK"), minimum=0, what="node rank")
    master = _agreeing_str(env, ("PET_MASTER_ADDR", "MASTER_ADDR"), what="master address")
    port = _agreeing_int(env, ("PET_MASTER_PORT", "MASTER_PORT"), minimum=1, what="master port")
    procs: int | None = None
    nproc_text = env.get("PET_NPROC_PER_NODE", "").strip()
    if nproc_text and nproc_text not in ("auto", "gpu"):
        procs = _as_int("PET_NPROC_PER_NODE", nproc_text, minimum=1)
    return node_rank, num_nodes, master, port, procs


def _check_pytorchjob_world_size(env: Mapping[str, str], num_nodes: int, procs: int) -> None:
    world = _opt_int(env, "WORLD_SIZE", minimum=1)
    if world is not None and world not in (num_nodes, num_nodes * procs):
        raise ClusterEnvError(
            f"contradictory PyTorchJob environment: WORLD_SIZE={world} is neither PET_NNODES "
            f"({num_nodes}) nor PET_NNODES x processes per node ({num_nodes * procs})"
        )


def _volcano(env: Mapping[str, str]) -> _Mapped:
    task_index = _agreeing_int(
        env, ("VK_TASK_INDEX", "VC_TASK_INDEX"), minimum=0, what="task index"
    )
    plugin_vars = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if name in env]
    if plugin_vars:  # the pytorch plugin: pod-level rank over the master and worker tasks
        missing = [
            name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in env
        ]
        if missing:
            raise ClusterEnvError(
                f"incomplete Volcano pytorch-plugin environment: {', '.join(plugin_vars)} set but "
                f"{', '.join(missing)} missing"
            )
        node_rank = _as_int("RANK", env["RANK"], minimum=0)
        num_nodes = _as_int("WORLD_SIZE", env["WORLD_SIZE"], minimum=1)
        port = _as_int("MASTER_PORT", env["MASTER_PORT"], minimum=1)
        return node_rank, num_nodes, env["MASTER_ADDR"].strip(), port, None

    hosts_var = _volcano_hosts_var(env)
    hosts = [h.strip() for h in env[hosts_var].split(",") if h.strip()]
    if not hosts:
        raise ClusterEnvError(f"{hosts_var} is empty")
    num_var = hosts_var[: -len("_HOSTS")] + "_NUM"
    listed = _opt_int(env, num_var, minimum=1)
    if listed is not None and listed != len(hosts):
        raise ClusterEnvError(
            f"contradictory Volcano environment: {num_var}={listed} "
            f"but {hosts_var} lists {len(hosts)} hosts"
        )
    svc_port = _opt_int(env, "ELCREC_MASTER_PORT", minimum=1)
    return (
        task_index,
        len(hosts),
        hosts[0],
        svc_port if svc_port is not None else DEFAULT_MASTER_PORT,
        None,
    )


def _volcano_hosts_var(env: Mapping[str, str]) -> str:
    task = env.get("ELCREC_VOLCANO_TASK", "").strip()
    if task:
        name = f"VC_{task.upper().replace('-', '_')}_HOSTS"
        if name not in env:
            raise ClusterEnvError(
                f"ELCREC_VOLCANO_TASK={task!r} but {name} is not set (is the svc plugin enabled?)"
            )
        return name
    candidates = sorted(name for name in env if _VOLCANO_HOSTS.match(name))
    if not candidates:
        raise ClusterEnvError(
            "Volcano job without rank information: enable the pytorch plugin (RANK, WORLD_SIZE, "
            "MASTER_ADDR) or the svc plugin (VC_<TASK>_HOSTS)"
        )
    if len(candidates) > 1:
        raise ClusterEnvError(
            f"Volcano job with several tasks ({', '.join(candidates)}): set ELCREC_VOLCANO_TASK to "
            "the training task"
        )
    return candidates[0]


# --- parsing helpers -----------------------------------------------------------------------------

def _req(env: Mapping[str, str], name: str, *, why: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ClusterEnvError(f"{name} is not set ({why})")
    return value


def _as_int(name: str, text: str, *, minimum: int) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ClusterEnvError(f"{name}={text!r} is not an integer")
    value = int(text)
    if value < minimum:
        raise ClusterEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _req_int(env: Mapping[str, str], name: str, *, minimum: int, why: str) -> int:
    return _as_int(name, _req(env, name, why=why), minimum=minimum)


def _opt_int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    text = env.get(name, "").strip()
    return _as_int(name, text, minimum=minimum) if text else None


def _agreeing_int(
    env: Mapping[str, str], names: tuple[str, ...], *, minimum: int, what: str
) -> int:
    values = {
        name: _as_int(name, env[name], minimum=minimum)
        for name in names
        if env.get(name, "").strip()
    }
    return _agree(values, names, what)


def _agreeing_str(env: Mapping[str, str], names: tuple[str, ...], *, what: str) -> str:
    values = {name: env[name].strip() for name in names if env.get(name, "").strip()}
    return _agree(values, names, what)


def _agree(values: dict[str, _T], names: tuple[str, ...], what: str) -> _T:
    if not values:
        raise ClusterEnvError(f"{what} missing: set {' or '.join(names)}")
    distinct = set(values.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ClusterEnvError(f"contradictory {what}: {shown}")
    return next(iter(values.values()))
