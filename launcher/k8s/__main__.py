"""``python -m launcher.k8s`` (see ``launcher.k8s.cli``)."""

from launcher.common import run_main
from launcher.k8s.cli import main

if __name__ == "__main__":
    run_main(main)
