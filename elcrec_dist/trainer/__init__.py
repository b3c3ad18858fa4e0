"""Training: the loop (``loop``), the engine and the step (``engine``), the intent sources and
centre statistics (``intents``), sharded evaluation (``validation``) and a whole run with its
run folder (``run``). Checkpoints are ``elcrec_dist.checkpoint``'s."""

from elcrec_dist.trainer.loop import FitResult, Trainer, fit
from elcrec_dist.trainer.run import train

__all__ = ["FitResult", "Trainer", "fit", "train"]
