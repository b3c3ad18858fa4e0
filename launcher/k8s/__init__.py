"""Kubernetes submission for elcrec-dist: manifests (``manifests``), kubectl (``kubectl``) and the
``python -m launcher.k8s`` command line (``cli``). See docs/KUBERNETES.md."""
