"""``python -m launcher.k8s``: render, submit and follow training and data-prep jobs.

    python -m launcher.k8s render --config configs/beauty.yaml --nodes 4 --gpus-per-node 8 \\
        --image REGISTRY/elcrec-dist@sha256:DIGEST --data s3://BUCKET/datasets/beauty \\
        --run-dir s3://BUCKET/runs/beauty-4x8          # prints the manifests (YAML)
        [--kubeflow | --trainjob] [--queue LOCALQUEUE] [--priority-class NAME]
    python -m launcher.k8s submit ...same flags... [--context CTX]   # applies; prints the job name
    python -m launcher.k8s status NAME [--wait]        # job and pods; --wait exits 0 done, 1 failed
    python -m launcher.k8s logs NAME [--index 0] [--follow]
    python -m launcher.k8s prep render|submit --name shop --input 's3://BUCKET/logs/*.parquet' \\
        --output s3://BUCKET/datasets/shop --map-workers 32 --reduce-workers 16 --write-workers 8 \\
        --image IMG@sha256:DIGEST                      # plan, map, reduce, kcore, write, commit

Exit codes: 0 ok; 2 bad options or config, no kubectl, no kube context, a job that already exists;
75 the API server could not be reached; 1 a job that failed or another kubectl error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from elcrec_dist.config import ConfigError, load_config
from launcher.k8s import manifests as m
from launcher.k8s.kubectl import Kubectl, KubectlError, find_kubectl

INSTANCE_LABEL = "app.kubernetes.io/instance"
# The workload's API resource, as kubectl names it, per --kubeflow / --trainjob.
RESOURCES = {"job": "job", "pytorchjob": "pytorchjobs.kubeflow.org",
             "trainjob": "trainjobs.trainer.kubeflow.org"}
JOB_KINDS = ("Job", "PyTorchJob", "TrainJob")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
ONE_POD_STAGES = ("plan", "kcore", "commit")
DEFAULT_MASTER_PORT = 29500


# --- rendering ------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded run config) as readable ``|`` blocks; a value used twice
    (one pod template in two replica specs) written out twice, not as a YAML anchor."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(objects: Sequence[m.Obj]) -> str:
    return yaml.dump_all(list(objects), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def resolved_config_yaml(config_path: str, overrides: Sequence[str]) -> tuple[str, str]:
    """(config name, YAML of the resolved config); the trainer reads it back unchanged."""
    config = load_config(config_path, list(overrides))
    header = (
        f"# Resolved by `python -m launcher.k8s render` from {config_path}"
        + (f" with --set {' --set '.join(overrides)}" if overrides else "")
        + ".\n# data.path and train.run_dir come from --data / --run-dir "
        "(ELCREC_DATA, ELCREC_RUN_DIR).\n"
    )
    return config.name, header + yaml.safe_dump(config.to_dict(), sort_keys=False)


def pod_options(args: argparse.Namespace) -> m.PodOptions:
    options = m.PodOptions(
        image=args.image,
        namespace=args.namespace,
        image_pull_policy=args.image_pull_policy,
        service_account=args.service_account,
        s3_secret=args.s3_secret,
        node_selector=tuple(
            m.parse_key_value(t, what="--node-selector") for t in args.node_selector
        ),
        tolerations=tuple(m.parse_toleration(t) for t in args.toleration),
        image_pull_secrets=tuple(args.image_pull_secret),
        allow_mutable_image=args.allow_mutable_image,
        queue=args.queue,
        priority_class=args.priority_class,
    )
    if warning := m.mutable_image_warning(options.image):
        print(warning, file=sys.stderr)
    return options


def workload_kind(args: argparse.Namespace) -> str:
    return "trainjob" if args.trainjob else "pytorchjob" if args.kubeflow else "job"


def train_spec(args: argparse.Namespace) -> m.TrainSpec:
    config_name, config_yaml = resolved_config_yaml(args.config, args.overrides)
    master_port = args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT
    if workload_kind(args) == "trainjob":
        if args.master_port not in (None, m.TRAINJOB_PORT):
            raise ConfigError(f"--master-port {args.master_port}: the Kubeflow Trainer fixes the "
                              f"rendezvous port of a TrainJob at {m.TRAINJOB_PORT}")
        master_port = m.TRAINJOB_PORT
    return m.TrainSpec(
        name=m.check_name(args.name) if args.name else m.default_name(config_name),
        config_yaml=config_yaml,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        data=m.parse_location(args.data, what="--data"),
        run_dir=m.parse_location(args.run_dir, what="--run-dir"),
        pod=pod_options(args),
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        scratch_size=args.scratch_size,
        master_port=master_port,
        retries=args.retries,
        grace_period_s=args.grace_period,
        train_args=tuple(args.train_arg),
        tensorboard=args.tensorboard,
        tensorboard_secret=args.tensorboard_s3_secret,
        tensorboard_service_account=args.tensorboard_service_account,
    )


def prep_spec(args: argparse.Namespace) -> m.PrepSpec:
    input_path, input_claim = m.parse_prep_input(args.input)
    prep_yaml = None
    if args.prep_config:
        path = Path(args.prep_config)
        if not path.is_file():
            raise ConfigError(f"--prep-config: {path} not found")
        prep_yaml = path.read_text()
    return m.PrepSpec(
        name=m.check_name(args.name),
        input=input_path,
        input_claim=input_claim,
        output=m.parse_location(args.output, what="--output"),
        map_workers=args.map_workers,
        reduce_workers=args.reduce_workers,
        write_workers=args.write_workers,
        parallelism=args.parallelism,
        prep_config_yaml=prep_yaml,
        pod=pod_options(args),
        cpu=args.cpu,
        memory=args.memory,
        scratch_size=args.scratch_size,
        retries_per_index=args.retries,
        prep_args=tuple(args.prep_arg),
    )


def prep_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in m.PREP_STAGES]
    if unknown or not stages:
        raise ConfigError(
            f"--stages {text!r}: expected a comma-separated subset of {','.join(m.PREP_STAGES)}"
        )
    return [s for s in m.PREP_STAGES if s in stages]  # always in pipeline order


# --- job state ------------------------------------------------------------------------------------

def job_state(job: dict[str, Any]) -> str:
    """Complete, Failed, Suspended, Running or Pending, from a Job's (PyTorchJob's, TrainJob's)
    status."""
    status = job.get("status") or {}
    true_conditions = {
        c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"
    }
    for state in ("Failed", "Complete", "Succeeded", "Suspended"):
        if state in true_conditions:
            return "Complete" if state == "Succeeded" else state
    if status.get("active") or "Running" in true_conditions:
        return "Running"
    return "Pending"


def pod_index(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        if INDEX_KEY in source:
            return int(source[INDEX_KEY])
    labels = meta.get("labels") or {}
    kind = labels.get("training.kubeflow.org/replica-type")
    if kind is not None and "training.kubeflow.org/replica-index" in labels:
        index = int(labels["training.kubeflow.org/replica-index"])
        return index if kind.lower() == "master" else index + 1
    return None


def pod_summary(pod: dict[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    summary: dict[str, Any] = {
        "name": pod["metadata"]["name"],
        "index": pod_index(pod),
        "phase": status.get("phase", "Unknown"),
        "node": (pod.get("spec") or {}).get("nodeName"),
        "restarts": sum(
            int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or []
        ),
    }
    for c in status.get("containerStatuses") or []:
        terminated = (
            (c.get("state") or {}).get("terminated")
            or (c.get("lastState") or {}).get("terminated")
        )
        if terminated:
            summary["exit_code"] = terminated.get("exitCode")
            summary["reason"] = terminated.get("reason")
    return summary


def summarize(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    jobs = []
    pods = []
    for item in items:
        kind = item.get("kind")
        if kind in JOB_KINDS:
            status = item.get("status") or {}
            jobs.append({
                "kind": kind,
                "name": item["metadata"]["name"],
                "state": job_state(item),
                "completions": (item.get("spec") or {}).get("completions"),
                "succeeded": status.get("succeeded", 0),
                "failed": status.get("failed", 0),
                "active": status.get("active", 0),
                "conditions": [
                    {k: c.get(k) for k in ("type", "status", "reason", "message")}
                    for c in status.get("conditions") or []
                ],
            })
        elif kind == "Pod":
            pods.append(pod_summary(item))
    pods.sort(key=lambda p: (p["index"] if p["index"] is not None else -1, p["name"]))
    return {"jobs": jobs, "pods": pods}


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for job in summary["jobs"]:
        done = (
            f"{job['succeeded']}/{job['completions']}"
            if job["completions"] is not None
            else str(job["succeeded"])
        )
        lines.append(f"{job['kind'].lower()} {job['name']}: {job['state']} (succeeded {done}, "
                     f"failed {job['failed']}, active {job['active']})")
        for c in job["conditions"]:
            if c["status"] == "True":
                lines.append(
                    f"  {c['type']}: {c.get('reason') or ''} {c.get('message') or ''}".rstrip()
                )
    for pod in summary["pods"]:
        extra = f" exit {pod['exit_code']} ({pod['reason']})" if "exit_code" in pod else ""
        lines.append(
            f"  pod {pod['name']} index {pod['index']}: {pod['phase']} node {pod['node'] or '-'} "
            f"restarts {pod['restarts']}{extra}"
        )
    return "\n".join(lines) if lines else "nothing found"


def wait_for_job(kubectl: Kubectl, kind: str, name: str, *, poll_s: float, timeout_s: float,
                 report: Callable[[str], None], sleep: Callable[[float], None] = time.sleep) -> str:
    """Poll until the job is Complete or Failed (returned); KubectlError past ``timeout_s``."""
    started = time.monotonic()
    last = ""
    while True:
        job = kubectl.json(["get", kind, name])
        state = job_state(job)
        status = job.get("status") or {}
        line = (
            f"{name}: {state} (succeeded {status.get('succeeded', 0)}/"
            f"{(job.get('spec') or {}).get('completions', '?')})"
        )
        if line != last:
            report(line)
            last = line
        if state in ("Complete", "Failed"):
            return state
        if timeout_s and time.monotonic() - started > timeout_s:
            raise KubectlError(["get", kind, name], 0, f"still {state} after {timeout_s:g} s")
        sleep(poll_s)


# --- commands -------------------------------------------------------------------------------------

def _kubectl(args: argparse.Namespace) -> Kubectl:
    kubectl = Kubectl(find_kubectl(args.kubectl), context=args.context, namespace=args.namespace)
    kubectl.check_context()
    return kubectl


def _refuse_existing(kubectl: Kubectl, kind: str, name: str) -> None:
    if kubectl.run(["get", kind, name, "--ignore-not-found", "-o", "name"]).strip():
        raise ConfigError(
            f"{kind} {name} already exists: a job's pods cannot be changed in place. Delete it "
            f"(kubectl delete {kind} {name}) or choose another --name"
        )


def cmd_render(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_yaml(m.training_objects(train_spec(args), kind=workload_kind(args))))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    spec = train_spec(args)  # config and options are checked before any cluster call
    objects = m.training_objects(spec, kind=workload_kind(args))
    kubectl = _kubectl(args)
    _refuse_existing(kubectl, RESOURCES[workload_kind(args)], spec.name)
    apply = ["apply", "-f", "-"] + ([f"--dry-run={args.dry_run}"] if args.dry_run else [])
    print(kubectl.run(apply, stdin=dump_yaml(objects)).rstrip(), file=sys.stderr)
    ns = f" --namespace {args.namespace}" if args.namespace else ""
    print(
        f"follow it with: python -m launcher.k8s status {spec.name}{ns} --wait\n"
        f"                python -m launcher.k8s logs {spec.name}{ns} --follow\n"
        + (f"TensorBoard:    kubectl{ns} port-forward deployment/{spec.tensorboard_name} "
           f"{m.TENSORBOARD_PORT}:{m.TENSORBOARD_PORT}" if spec.tensorboard else ""),
        file=sys.stderr,
    )
    print(spec.name)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    kubectl = _kubectl(args)
    selector = f"{INSTANCE_LABEL}={args.name}"
    kinds = ("jobs,pods" + (",pytorchjobs.kubeflow.org" if args.kubeflow else "")
             + (",trainjobs.trainer.kubeflow.org" if args.trainjob else ""))
    while True:
        summary = summarize(kubectl.json(["get", kinds, "-l", selector]).get("items", []))
        if args.output == "json":
            print(json.dumps(summary, indent=2))
        else:
            print(format_summary(summary))
        states = {job["state"] for job in summary["jobs"]}
        if not summary["jobs"]:
            print(f"no job labelled {selector}", file=sys.stderr)
            return 1
        if "Failed" in states:
            return 1
        if not args.wait or states == {"Complete"}:
            return 0
        time.sleep(args.poll_s)
        print("", flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    kubectl = _kubectl(args)
    component = f"prep-{args.stage}" if args.stage else "trainer"
    selector = f"{INSTANCE_LABEL}={args.name},app.kubernetes.io/component={component}"
    pods = [p for p in kubectl.json(["get", "pods", "-l", selector]).get("items", [])
            if (args.stage and args.stage in ONE_POD_STAGES) or pod_index(p) == args.index]
    if not pods:
        print(f"error: no pod of {args.name} ({component}) with index {args.index} yet; "
              f"see `python -m launcher.k8s status {args.name}`", file=sys.stderr)
        return 1
    newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))  # the latest retry
    cmd = ["logs", newest["metadata"]["name"]]
    if args.follow:
        cmd.append("--follow")
    if args.tail is not None:
        cmd.append(f"--tail={args.tail}")
    return kubectl.stream(cmd)


def cmd_prep_render(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_yaml(m.prep_objects(prep_spec(args), prep_stages(args.stages))))
    return 0


def cmd_prep_submit(args: argparse.Namespace) -> int:
    """Stages run in order; each starts only after the one before completed. A stage whose Job
    already completed (a rerun after a later stage failed) is skipped."""
    spec = prep_spec(args)
    stages = prep_stages(args.stages)
    kubectl = _kubectl(args)
    if spec.prep_config_yaml is not None:
        print(
            kubectl.run(["apply", "-f", "-"], stdin=dump_yaml([m.prep_config_map(spec)])).rstrip(),
            file=sys.stderr,
        )
    for stage in stages:
        name = spec.job_name(stage)
        existing = kubectl.run(["get", "job", name, "--ignore-not-found", "-o", "json"]).strip()
        if existing:
            state = job_state(json.loads(existing))
            if state != "Complete":
                raise ConfigError(
                    f"job {name} already exists ({state}); "
                    f"delete it (kubectl delete job {name}) to rerun the stage"
                )
            print(f"{name}: already complete, skipped", file=sys.stderr)
            continue
        print(
            kubectl.run(["apply", "-f", "-"], stdin=dump_yaml([m.prep_job(spec, stage)])).rstrip(),
            file=sys.stderr,
        )
        state = wait_for_job(kubectl, "job", name, poll_s=args.poll_s, timeout_s=args.timeout_s,
                             report=lambda line: print(line, file=sys.stderr, flush=True))
        if state == "Failed":
            print(
                f"error: stage {stage} failed; see `python -m launcher.k8s status {spec.name}` and "
                f"`python -m launcher.k8s logs {spec.name} --stage {stage} --index N`",
                file=sys.stderr,
            )
            return 1
    print(spec.output.path)
    return 0


# --- argument parsing -----------------------------------------------------------------------------

def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", help="namespace (default: the context's)")
    p.add_argument("--context", help="kube context (default: the current one)")
    p.add_argument("--kubectl", help="kubectl binary (default: $KUBECTL or kubectl on PATH)")


def _pod_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="container image built from k8s/Dockerfile")
    p.add_argument(
        "--image-pull-policy", default="IfNotPresent", choices=("Always", "IfNotPresent", "Never")
    )
    p.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME")
    p.add_argument("--service-account", help="pod identity for S3 (IRSA, Workload Identity, ...)")
    p.add_argument(
        "--s3-secret",
        default="elcrec-s3",
        help="Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, "
        "...) become env; optional, '' to omit (default elcrec-s3)",
    )
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--allow-mutable-image", action="store_true",
                   help="accept an --image tag instead of a digest (prints a warning)")
    p.add_argument("--queue", metavar="LOCALQUEUE",
                   help="Kueue LocalQueue: labels the workload kueue.x-k8s.io/queue-name")
    p.add_argument("--priority-class", metavar="NAME", help="priorityClassName of the pods")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (configs/...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for launcher/train.py (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="pods (machines)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        required=True,
        help="GPUs per pod (0: CPU ranks, see --procs-per-node)",
    )
    p.add_argument("--procs-per-node", type=int, help="ranks per pod (default: --gpus-per-node)")
    p.add_argument("--data", required=True,
                   help="prepared dataset: s3://BUCKET/PATH or pvc://CLAIM/PATH")
    p.add_argument("--run-dir", required=True,
                   help="run folder: s3://BUCKET/PATH or pvc://CLAIM/PATH")
    p.add_argument("--name", help="job name (default elcrec-<config name>)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--kubeflow", action="store_true",
                      help="a Kubeflow PyTorchJob (training operator) instead of an Indexed Job")
    kind.add_argument("--trainjob", action="store_true",
                      help="a Kubeflow Trainer v2 TrainJob and its TrainingRuntime instead")
    p.add_argument("--cpu", help="CPU request per pod, e.g. 32")
    p.add_argument("--memory", help="memory request and limit per pod, e.g. 200Gi")
    p.add_argument("--shm-size", default="16Gi", help="/dev/shm size (default 16Gi)")
    p.add_argument("--grace-period", type=int, default=300, metavar="S",
                   help="seconds from SIGTERM to SIGKILL for a trainer pod, time for its "
                        "checkpoint (default 300; Kubernetes' own is 30)")
    p.add_argument("--scratch-size", default="20Gi", help="/tmp size (default 20Gi)")
    p.add_argument("--master-port", type=int,
                   help=f"rendezvous port (default {DEFAULT_MASTER_PORT}; a TrainJob's is "
                        f"{m.TRAINJOB_PORT})")
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="gang restarts allowed (backoffLimit = nodes x retries)",
    )
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for launcher/train.py "
        "(repeatable; write --train-arg=--flag for one that starts with -)",
    )
    p.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="omit the TensorBoard Deployment",
    )
    p.add_argument("--tensorboard-s3-secret", default="elcrec-s3-readonly",
                   help="TensorBoard's own, read-only storage Secret (optional; '' to omit; "
                        "default elcrec-s3-readonly); never the trainer's --s3-secret")
    p.add_argument("--tensorboard-service-account",
                   help="TensorBoard's own ServiceAccount (a read-only cloud identity)")
    _pod_args(p)


def _prep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="raw logs: s3://BUCKET/GLOB or pvc://CLAIM/GLOB")
    p.add_argument("--output", required=True,
                   help="dataset folder: s3://BUCKET/PATH or pvc://CLAIM/PATH")
    p.add_argument("--name", required=True, help="prefix of the stage jobs ({name}-prep-map, ...)")
    p.add_argument("--map-workers", type=int, required=True)
    p.add_argument("--reduce-workers", type=int, required=True)
    p.add_argument(
        "--write-workers",
        type=int,
        default=1,
        help="pods of the write stage (at most the dataset's shards)",
    )
    p.add_argument("--parallelism", type=int, help="pods at once per stage (default: all workers)")
    p.add_argument(
        "--prep-config", help="data_prep YAML (configs/prep/...), mounted for every stage"
    )
    p.add_argument(
        "--stages", default=",".join(m.PREP_STAGES), help=f"subset of {','.join(m.PREP_STAGES)}"
    )
    p.add_argument("--cpu", default="2")
    p.add_argument("--memory", default="8Gi")
    p.add_argument("--scratch-size", default="50Gi", help="/tmp (spill) size per pod")
    p.add_argument("--retries", type=int, default=2, help="retries per worker index")
    p.add_argument(
        "--prep-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for data_prep.build, e.g. --prep-arg=--user-col=uid (repeatable)",
    )
    _pod_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher.k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="print the training manifests")
    _train_args(render)
    render.add_argument("--namespace", "-n")
    render.set_defaults(func=cmd_render)

    submit = sub.add_parser("submit", help="apply the training manifests; prints the job name")
    _train_args(submit)
    _cluster_args(submit)
    submit.add_argument("--dry-run", choices=("client", "server"), help="passed to kubectl apply")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="the job and its pods")
    status.add_argument("name")
    status.add_argument(
        "--wait", action="store_true", help="until complete (exit 0) or failed (exit 1)"
    )
    status.add_argument("--poll-s", type=float, default=15.0)
    status.add_argument("--output", "-o", choices=("text", "json"), default="text")
    status.add_argument("--kubeflow", action="store_true", help="also list PyTorchJobs")
    status.add_argument("--trainjob", action="store_true", help="also list TrainJobs")
    _cluster_args(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="logs of one pod (the newest try of a node index)")
    logs.add_argument("name")
    logs.add_argument(
        "--index", type=int, default=0, help="node (or prep worker) index (default 0: rank 0)"
    )
    logs.add_argument(
        "--stage", choices=m.PREP_STAGES, help="a data-prep stage instead of training"
    )
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--tail", type=int)
    _cluster_args(logs)
    logs.set_defaults(func=cmd_logs)

    prep = sub.add_parser("prep", help="data-prep jobs: plan, map, reduce, kcore, write, commit")
    prep_sub = prep.add_subparsers(dest="prep_command", required=True)
    prep_render = prep_sub.add_parser("render", help="print the stage Jobs")
    _prep_args(prep_render)
    prep_render.add_argument("--namespace", "-n")
    prep_render.set_defaults(func=cmd_prep_render)
    prep_submit = prep_sub.add_parser("submit", help="run the stages in order, waiting for each")
    _prep_args(prep_submit)
    _cluster_args(prep_submit)
    prep_submit.add_argument("--poll-s", type=float, default=10.0)
    prep_submit.add_argument("--timeout-s", type=float, default=0.0, help="per stage; 0: none")
    prep_submit.set_defaults(func=cmd_prep_submit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KubectlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
