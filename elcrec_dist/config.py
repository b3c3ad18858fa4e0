"""Typed experiment configuration.

Precedence, lowest to highest: dataclass defaults -> YAML file -> ``--set a.b=c`` overrides.
Unknown keys and values of the wrong type are errors that name the key; nothing falls back
silently. The resolved config is a plain dict (``to_dict``) written into the run folder and into
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from elcrec_dist.errors import PermanentError


class _Loader(yaml.SafeLoader):
    """safe_load's loader, but reading ``1e-3`` as a float (YAML 1.2), not as a string (YAML
    1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` semantics (no arbitrary objects) with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


T = TypeVar("T")


class ConfigError(PermanentError, ValueError):
    """A configuration value or key is wrong. Permanent: retrying will not help."""


@dataclass(frozen=True)
class ModelConfig:
    """SASRec encoder plus learnable intent centres (spec: "Encoder (SASRec)")."""

    num_layers: int = 1
    hidden_size: int = 64
    num_heads: int = 2
    max_len: int = 50
    hidden_dropout: float = 0.5
    attention_dropout: float = 0.5
    num_clusters: int = 256
    init_std: float = 0.02
    layer_norm_eps: float = 1e-12
    # Where the intents come from. "learned": ELCRec, the centres are a parameter trained with
    # the encoder (k-means start once, on a bounded sample). "epoch_kmeans": the ICLRec-style
    # baseline ELCRec replaces, k-means over all training users' embeddings at the start of every
    # epoch; the centres stay fixed (no gradient) for the epoch.
    intents: Literal["learned", "epoch_kmeans"] = "learned"

    def validate(self) -> None:
        require(self.num_layers >= 1, "model.num_layers must be >= 1")
        require(self.hidden_size >= 1, "model.hidden_size must be >= 1")
        require(
            self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
            f"model.num_heads ({self.num_heads}) must divide "
            f"model.hidden_size ({self.hidden_size})",
        )
        require(self.max_len >= 2, "model.max_len must be >= 2")
        require(self.num_clusters >= 1, "model.num_clusters must be >= 1")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"model.{name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class LossConfig:
    """Weights and forms of the named loss terms (spec: "Losses", item 6)."""

    # Intent fusion in the sequence CL: "shift" adds the nearest centre to each time step,
    # "concat" appends it, "none" contrasts the plain views (ICLRec's sequence CL).
    fusion: Literal["shift", "concat", "none"] = "shift"
    # The next-item term (spec: "Losses", item 1). "bce" (the paper): binary cross-entropy of the
    # target against one sampled negative per position. "softmax" (beyond the paper): cross-entropy
    # of the target against the whole catalogue (every item but padding), which every row of the
    # item table receives a gradient from; docs/notes/time-to-quality.md says why and what it
    # costs. It needs deepspeed.item_exchange=dense (every row is touched).
    next_item: Literal["bce", "softmax"] = "bce"
    # The most [positions x N] logits the softmax next-item term holds at once (2^26: 256 MiB of
    # float32). A step with more scores its real positions in chunks and recomputes each chunk's
    # logits in the backward pass: memory O(chunk x N) instead of O(positions x N), for one more
    # product, the same numbers to rounding. What lets the softmax train on a catalogue of
    # millions of items (docs/PERFORMANCE.md). At least one position a chunk. A Beauty step
    # (about 1,460 real positions at batch 256 x 12,101 items) stays whole.
    softmax_max_logits: int = 2**26
    seq_cl_weight: float = 0.1
    intent_cl_weight: float = 0.1
    cluster_weight: float = 1.0  # alpha in the paper
    # "all": mean over all k^2 centre pairs, diagonal included (reference run);
    # "distinct": 1/(k(k-1)) over i != j (the paper's equation).
    cluster_pairs: Literal["all", "distinct"] = "all"
    # How the centres' gradient passes the L2 normalisation of the cluster loss. "reference":
    # as in the reference run, which normalised the parameter's data in place before the step and
    # differentiated the loss at the raw (unit) rows, so the gradient keeps its radial part
    # (which the next re-projection removes, but which Adam's moments see). "tangent": through
    # F.normalize, so only the part tangent to the sphere reaches the optimizer. Applies to
    # every cluster_form (each normalises the centres the same way).
    centre_gradient: Literal["reference", "tangent"] = "reference"
    # "published": the paper's loss (see losses.cluster_loss), which depends on the centres only
    # through their mean. "assigned_uniform" (ours): pull each user to its nearest centre, plus
    # a uniformity term over centre pairs (losses.assigned_uniform_cluster_loss);
    # "balanced_uniform" (ours): the same with a balanced soft assignment (Sinkhorn, equal
    # shares per centre) in place of the nearest centre (losses.balanced_uniform_cluster_loss).
    cluster_form: Literal["published", "assigned_uniform", "balanced_uniform"] = "published"
    temperature: float = 1.0
    # Beyond the paper (default None: ``temperature``, the paper's 1): the temperature of the
    # sequence-contrastive term alone. Its logits are raw dot products of flattened T x D states,
    # a sum over T positions, so at temperature 1 the term starts near 140-180 and its gradient
    # dwarfs the next-item loss's (docs/notes/slow-start.md); T (max_len) makes each logit the
    # mean over positions of per-position dot products. See docs/RESULTS.md, "Time to quality".
    seq_cl_temperature: float | None = None
    # Contrastive negatives under data parallelism: "global" gathers every rank's rows (with
    # gradient) so 2 ranks x 128 compute the loss of 1 rank x 256; "local" uses this rank's only.
    negatives: Literal["global", "local"] = "global"

    @property
    def seq_cl_tau(self) -> float:
        """The sequence-contrastive term's temperature (``seq_cl_temperature`` if set)."""
        return self.temperature if self.seq_cl_temperature is None else self.seq_cl_temperature

    def validate(self) -> None:
        require(self.temperature > 0, "loss.temperature must be > 0")
        require(
            self.seq_cl_temperature is None or self.seq_cl_temperature > 0,
            f"loss.seq_cl_temperature must be > 0 (or null: loss.temperature), "
            f"got {self.seq_cl_temperature}",
        )
        for name in ("seq_cl_weight", "intent_cl_weight", "cluster_weight"):
            require(getattr(self, name) >= 0, f"loss.{name} must be >= 0")
        require(
            self.softmax_max_logits >= 1,
            f"loss.softmax_max_logits must be >= 1, got {self.softmax_max_logits}",
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Sequence augmentations for the two contrastive views (spec: "Losses", item 3)."""

    crop_ratio: float = 0.2
    mask_ratio: float = 0.7
    reorder_ratio: float = 0.2
    methods: tuple[str, ...] = ("crop", "mask", "reorder")
    # Where crop and reorder windows may start: "all" draws every valid start; "reference" the
    # reference run's draw, which never picks the newest window (see elcrec_dist.augment).
    window_starts: Literal["all", "reference"] = "all"

    def validate(self) -> None:
        require(
            self.window_starts in ("all", "reference"),
            f"augment.window_starts must be 'all' or 'reference', got {self.window_starts!r}",
        )
        for name in ("crop_ratio", "mask_ratio", "reorder_ratio"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"augment.{name} must be in [0, 1], got {value}")
        require(len(self.methods) >= 1, "augment.methods must name at least one method")
        for method in self.methods:
            require(
                method in ("crop", "mask", "reorder"),
                f"augment.methods: unknown method {method!r} (expected crop, mask or reorder)",
            )


@dataclass(frozen=True)
class KMeansConfig:
    """The one-off k-means start of the centres (spec: "Centres: start and keep-up")."""

    sample_users: int = 50_000  # bounded sample: cost does not grow with the dataset
    iterations: int = 20
    restarts: int = 5
    batch_size: int = 1024  # users per encoder pass while embedding the sample

    def validate(self) -> None:
        require(self.sample_users >= 1, "kmeans.sample_users must be >= 1")
        require(self.iterations >= 1, "kmeans.iterations must be >= 1")
        require(self.restarts >= 1, "kmeans.restarts must be >= 1")
        require(self.batch_size >= 1, "kmeans.batch_size must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared dataset lives (a folder or URL holding ``manifest.json``)."""

    path: str = ""

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1
    epochs: int = 300
    batch_size: int = 256  # users per optimizer step, summed over ranks
    lr: float = 1e-3
    # The learning rate over the run: "constant" (the paper: train.lr throughout) or "cosine"
    # (train.lr at the first step, then half a cosine down to train.lr_min at the last step of
    # train.epochs; elcrec_dist.trainer.schedule). A function of the global step alone, so a
    # resumed run follows the same curve.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min: float = 0.0  # the cosine's end value (unused by "constant")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    patience: int = 40  # early stopping on valid NDCG@20, counted in evaluations
    eval_every: int = 1  # epochs between validation passes
    run_dir: str = "runs/default"
    log_every: int = 50  # steps between loss logs
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: only at epoch ends)
    keep_checkpoints: int = 2  # complete checkpoints kept in RUN/checkpoints
    # Warm start on a new build (elcrec_dist.trainer.warmstart; launcher --init-from): a run
    # folder or model file whose encoder, centres and matched items' rows start this run; items
    # are matched through both builds' id maps. "" starts afresh.
    init_from: str = ""
    # torch's deterministic kernels (train.use_deterministic_kernels). Without them, on CPU with
    # more than one intra-op thread, the gradient of gathered rows (item embeddings, the centres
    # chosen by fusion and the intent CL) is summed in a thread-dependent order, so the same
    # command trains a different model each time.
    deterministic: bool = True
    # Steps in a row whose loss or gradient may be non-finite on some rank (each one skipped:
    # no update) before the run stops as diverged (exit 2); a finite step resets the count.
    max_nonfinite_steps: int = 3
    # Seconds a collective (and the rendezvous) waits for its peers before failing with exit 75:
    # a hung or dead peer stops the job within it. Phases where one rank works while the others
    # wait (k-means on rank 0, a checkpoint commit) must fit in it.
    collective_timeout_s: float = 120.0

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs must be >= 1")
        require(self.max_nonfinite_steps >= 1,
                f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        require(self.collective_timeout_s >= 1,
                "train.collective_timeout_s must be >= 1 (seconds), got "
                f"{self.collective_timeout_s}")
        require(self.batch_size >= 2, "train.batch_size must be >= 2 (contrastive negatives)")
        require(self.lr > 0, "train.lr must be > 0")
        require(0.0 <= self.lr_min <= self.lr,
                f"train.lr_min must be in [0, train.lr = {self.lr}], got {self.lr_min}")
        require(self.patience >= 1, "train.patience must be >= 1")
        require(self.eval_every >= 1, "train.eval_every must be >= 1")
        require(self.log_every >= 1, "train.log_every must be >= 1")
        require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        require(all(0.0 <= b < 1.0 for b in self.betas), "train.betas must be in [0, 1)")


# How the ranking treats a user's history items (elcrec_dist.evaluation's docstring).
HistoryItems = Literal["exclude", "score_zero"]
HISTORY_ITEMS: tuple[HistoryItems, ...] = ("exclude", "score_zero")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1024
    ks: tuple[int, ...] = (5, 10, 20)
    select_metric: str = "NDCG@20"  # validation metric for early stopping and best checkpoint
    # Items scored at a time (elcrec_dist.evaluation): memory follows batch_size x tile_items,
    # not the catalogue; the metrics do not depend on it.
    tile_items: int = 16384
    # The items of a user's input history (elcrec_dist.evaluation): "exclude" leaves them out of
    # the ranking and keeps a repeated answer rankable; "score_zero" is the reference run's rule
    # behind the paper's Table 1 (their scores set to 0, a repeated answer's too). The paper's
    # dataset configs use score_zero; they differ where answers repeat history items (Yelp).
    history_items: HistoryItems = "exclude"
    # Validation users: a seeded fixed sample of this many (the same users every epoch, at any
    # world size), or null for every user. The test pass always covers every user.
    valid_users: int | None = None
    # Sampled-negative metrics beside the full-ranking ones (elcrec_dist.sampled_metrics, as
    # RecBole's uni100/pop100): the answer against this many unseen items drawn uniformly or by
    # training popularity, reported as sampled_uni100/NDCG@10 etc.; 0 for none. Never selected on.
    sampled_negatives: int = 0
    sampled_distribution: Literal["uniform", "popularity"] = "uniform"

    def validate(self) -> None:
        require(self.batch_size >= 1, "eval.batch_size must be >= 1")
        require(self.tile_items >= 1, f"eval.tile_items must be >= 1, got {self.tile_items}")
        require(self.history_items in HISTORY_ITEMS,
                f"eval.history_items must be one of {HISTORY_ITEMS}, got {self.history_items!r}")
        require(self.valid_users is None or self.valid_users >= 1,
                f"eval.valid_users must be >= 1 or null (every user), got {self.valid_users}")
        require(self.sampled_negatives >= 0,
                f"eval.sampled_negatives must be >= 0, got {self.sampled_negatives}")
        require(len(self.ks) >= 1 and all(k >= 1 for k in self.ks), "eval.ks must be >= 1")
        names = {f"{m}@{k}" for k in self.ks for m in ("HR", "NDCG")} | {"MRR"}
        require(
            self.select_metric in names,
            f"eval.select_metric {self.select_metric!r} is not one of {sorted(names)}",
        )


@dataclass(frozen=True)
class DeepSpeedConfig:
    """Engine settings, kept apart from what the model computes."""

    zero_stage: int = 0
    bf16: bool = False
    torch_adam: bool = True  # fused Adam needs a JIT compile; torch Adam is the CPU choice
    gradient_clipping: float = 0.0
    # ZeRO stage 1/2 communication (elements per bucket; DeepSpeed's defaults). Smaller buckets
    # lower the peak memory of gradient reduction and parameter gathering at the cost of more,
    # smaller collectives; overlap_comm runs the reduction alongside the backward pass (more
    # memory). They change how gradients travel, not what they sum to, so a resume may change them.
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    # How the item table's gradient travels (elcrec_dist.trainer.exchange): "dense" all-reduces
    # the whole [N + 1, D] table every step (DeepSpeed's own path); "sparse" all-gathers only the
    # rows the step touched (ZeRO stage 0 only); "auto" takes, per step, the cheaper of the two
    # on the wire at stage 0, and dense at stages 1 and 2. The update equals the dense path's.
    item_exchange: Literal["dense", "sparse", "auto"] = "dense"

    def validate(self) -> None:
        require(self.zero_stage in (0, 1, 2), "deepspeed.zero_stage must be 0, 1 or 2")
        require(
            not (self.item_exchange == "sparse" and self.zero_stage != 0),
            f"deepspeed.item_exchange=sparse needs deepspeed.zero_stage 0 (ZeRO {self.zero_stage} "
            "reduces gradients in its own hooks); use dense, or auto (dense under ZeRO)",
        )
        require(
            self.reduce_bucket_size >= 1,
            f"deepspeed.reduce_bucket_size must be >= 1, got {self.reduce_bucket_size}",
        )
        # ZeRO aligns its all-gather buffers to 4 bytes, counted in 2-byte elements
        require(
            self.allgather_bucket_size >= 2 and self.allgather_bucket_size % 2 == 0,
            "deepspeed.allgather_bucket_size must be a positive even number, "
            f"got {self.allgather_bucket_size}",
        )
        # At stage 0 DeepSpeed keeps bf16 master weights in an optimizer without the fp32
        # accessors that the centres' per-step re-projection writes through (train.project_centres).
        require(
            not (self.bf16 and self.zero_stage == 0),
            "deepspeed.bf16 needs deepspeed.zero_stage 1 or 2 "
            "(the centre re-projection must reach the fp32 master copy)",
        )
        require(self.gradient_clipping >= 0, "deepspeed.gradient_clipping must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section: Any = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        require(
            not (self.loss.cluster_pairs == "distinct" and self.model.num_clusters < 2),
            "loss.cluster_pairs=distinct needs model.num_clusters >= 2",
        )
        require(
            not (self.loss.cluster_form != "published" and self.model.num_clusters < 2),
            f"loss.cluster_form={self.loss.cluster_form} needs model.num_clusters >= 2 "
            "(its uniformity term is over centre pairs)",
        )
        require(
            not (self.model.intents == "epoch_kmeans" and self.loss.cluster_weight > 0),
            "model.intents=epoch_kmeans keeps the centres fixed during an epoch: "
            f"set loss.cluster_weight to 0 (got {self.loss.cluster_weight})",
        )
        require(
            not (self.loss.next_item == "softmax" and self.deepspeed.item_exchange != "dense"),
            "loss.next_item=softmax gives every row of the item table a gradient: set "
            f"deepspeed.item_exchange to dense (got {self.deepspeed.item_exchange})",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds (for every ``validate``)."""
    if not condition:
        raise ConfigError(message)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation``; return it in the annotated form (lists -> tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return typed_from_mapping(annotation, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} ({value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _float32_number(float(value), key)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")  # pragma: no cover


# Every number of a config meets float32 arithmetic (weights, losses, optimizer state), where
# magnitudes outside [1.2e-38, 3.4e38] become 0 or infinity.
FLOAT32_SMALLEST_NORMAL = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


def _float32_number(number: float, key: str) -> float:
    """``number`` if float32 holds it: finite, and 0 or of a normal magnitude (a temperature of
    1e-320 is 0 in float32, its logits infinite); else ``ConfigError`` naming ``key``."""
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {number}")
    if number != 0 and not FLOAT32_SMALLEST_NORMAL <= abs(number) <= FLOAT32_MAX:
        raise ConfigError(f"{key}: {number!r} is outside float32's normal range (magnitudes "
                          f"{FLOAT32_SMALLEST_NORMAL:.2g} to {FLOAT32_MAX:.2g}, or 0): training "
                          "would compute with 0 or infinity in its place")
    return number


def typed_from_mapping(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from a plain mapping: every value checked against
    its annotation (nested dataclasses, literals, tuples, unions), unknown keys an error naming
    the key (under ``prefix``). Not validated beyond types: call the result's ``validate``."""
    hints = typing.get_type_hints(cls)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"typed_from_mapping: {cls!r} is not a dataclass")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(where + u for u in unknown)} "
            f"(known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {exc}") from exc
    return key, value


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    config = typed_from_mapping(ExperimentConfig, values, "")
    config.validate()
    return config


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: sections merge key by key, values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | Sequence[str | Path] | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Defaults, then the YAML file(s) at ``path`` (later files override earlier ones, section
    by section: e.g. a dataset config, then a variant that only sets loss weights), then
    ``key=value`` overrides."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    tree: dict[str, Any] = {}
    for one in paths:
        tree = _merge(tree, read_yaml_mapping(one))
    source = ", ".join(str(p) for p in paths)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{exc}") from None
