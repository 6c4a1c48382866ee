"""Config groups as typed settings: each group read once, checked at the start of a stage.

The YAML files in ``configs/`` are the one source of every default: these classes have no default
values, ``from_cfg`` requires every field to be in the group (a key missing from the YAML is a bug
the error names) and refuses keys it does not know, so no reader can fall back to a second,
hard-coded default (``tests/test_settings.py`` also refuses ``cfg.get("key", default)`` for a key
the YAML holds). ``of(x)`` takes a settings object as it is, or reads a config group into one, so
the functions below the stages accept either.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, ClassVar

from spp_det.errors import UserError


# the lists of choices, stated here once (the code that implements a choice imports its list from here)
UNKNOWN_CLASSES = ("error", "skip")    # data.unknown_classes (spp_det.data.voc.load_voc)
PROJECTIONS = ("paper", "release")     # model.projection (spp_det.features.projection.project_windows)
OPTIMIZERS = ("sgd", "adam")           # pretrain.optimizer (spp_det.training.loop.make_optimizer)
PRECISIONS = ("fp32", "bf16", "int8")  # eval / detect.precision (spp_det.inference.set_precision)
SCORERS = ("svm", "softmax")  # what scores a window at test time: the SVMs, or the fine-tuned fc8's softmax


def plain(value: Any) -> Any:
    """OmegaConf containers as plain (resolved) data; anything else as it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def as_tuple(value: Any) -> tuple | None:
    """A list value as a tuple; one string as a tuple of it (``detect.format=voc``); None as None."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


class GroupSettings:
    """A config group's settings (a frozen dataclass below); ``GROUP`` names it in messages."""

    GROUP: ClassVar[str] = ""
    TUPLES: ClassVar[tuple[str, ...]] = ()   # list values kept as tuples (hashable, frozen)
    # keys only some options of the group have (model.timm_name: timm backbones only): None where the
    # option has none. Not a default: the key does not apply there, and validate() requires it where it does
    OPTION_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_cfg(cls, group_cfg) -> "GroupSettings":
        raw = plain(group_cfg)
        if not isinstance(raw, dict):
            raise UserError(f"{cls.GROUP}: expected the {cls.GROUP} config group, got {raw!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        raw = {**{k: None for k in cls.OPTION_KEYS}, **raw}
        missing = [n for n in names if n not in raw]
        if missing:
            raise UserError(f"{cls.GROUP}: key(s) {', '.join(missing)} missing from the config "
                            f"(configs/{cls.GROUP}/ holds every default)")
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise UserError(f"{cls.GROUP}: unknown key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        values = {n: as_tuple(raw[n]) if n in cls.TUPLES else raw[n] for n in names}
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def of(cls, value) -> "GroupSettings":
        """``value`` when it is already these settings, else the config group read into them."""
        return value if isinstance(value, cls) else cls.from_cfg(value)

    def validate(self) -> None:
        """Refuse values no stage can work with (a ``UserError`` naming the key)."""

    def choice(self, key: str, options: tuple) -> None:
        if getattr(self, key) not in options:
            raise UserError(f"{self.GROUP}.{key} must be one of {', '.join(map(str, options))}, "
                            f"not {getattr(self, key)!r}")


@dataclasses.dataclass(frozen=True)
class DataSettings(GroupSettings):
    """``configs/data/*.yaml``."""

    GROUP: ClassVar[str] = "data"
    TUPLES: ClassVar[tuple[str, ...]] = ("classes",)

    root: str
    year: int | None
    train_split: str
    val_split: str | None
    val_fraction: float
    test_split: str
    classes: tuple[str, ...]
    unknown_classes: str
    use_difficult: bool
    flip: bool
    max_images: int | None
    allow_split_overlap: bool

    def validate(self) -> None:
        self.choice("unknown_classes", UNKNOWN_CLASSES)
        if not 0 < float(self.val_fraction) < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), not {self.val_fraction!r}")
        if not self.classes:
            raise UserError("data.classes is empty")


@dataclasses.dataclass(frozen=True)
class ModelSettings(GroupSettings):
    """``configs/model/*.yaml`` (every option extends zf5.yaml; the timm options add ``OPTION_KEYS``)."""

    GROUP: ClassVar[str] = "model"
    TUPLES: ClassVar[tuple[str, ...]] = ("scales", "pyramid_levels")
    OPTION_KEYS: ClassVar[tuple[str, ...]] = ("timm_name", "timm_kwargs")   # configs/model/efficientnet_lite0.yaml (lite1, lite2)

    backbone: str
    width: float
    weights: str | None
    pixel_mean: float | None
    scales: tuple[int, ...]
    max_size: int | None
    best_scale_area: float
    projection: str
    pyramid_levels: tuple[int, ...]
    fc_dim: int
    dropout: float
    backbone_checkpoint: str | None
    lrn: dict | None
    norm: str
    timm_name: str | None
    timm_kwargs: dict | None

    def validate(self) -> None:
        self.choice("norm", ("lrn", "batchnorm"))
        self.choice("projection", PROJECTIONS)
        if self.backbone == "timm" and not self.timm_name:
            raise UserError("model.backbone=timm needs model.timm_name (e.g. tf_efficientnet_lite0)")


@dataclasses.dataclass(frozen=True)
class FinetuneSettings(GroupSettings):
    """``configs/finetune/default.yaml``."""

    GROUP: ClassVar[str] = "finetune"
    TUPLES: ClassVar[tuple[str, ...]] = ("bg_iou", "lr_steps")

    batch_size: int
    fg_fraction: float
    fg_iou: float
    bg_iou: tuple[float, float]
    fc8_std: float
    lr: float
    lr_steps: tuple[int, ...]
    lr_gamma: float
    iterations: int
    momentum: float
    weight_decay: float
    val_every: int
    checkpoint_every: int
    max_bg_per_image: int | None
    pool_in_memory_mb: float


@dataclasses.dataclass(frozen=True)
class BboxregSettings(GroupSettings):
    """``configs/bboxreg/default.yaml``."""

    GROUP: ClassVar[str] = "bboxreg"

    min_iou: float
    lam: float
    feature_norm: float
    scale_images: int
    scale_windows: int
    max_per_class: int | None
    window_batch: int


@dataclasses.dataclass(frozen=True)
class ProposalsSettings(GroupSettings):
    """``configs/proposals/*.yaml`` (every option extends opencv_fast.yaml); ``runs()``: one settings per
    run of ``proposals.passes`` (each pass overrides these settings key by key)."""

    GROUP: ClassVar[str] = "proposals"
    OPTION_KEYS: ClassVar[tuple[str, ...]] = ("scales",                       # configs/proposals/selectivesearch.yaml
                                              "edge_sigma", "alpha", "beta", "min_score", "edge_min_mag")  # edgeboxes.yaml
    # the backends that compute boxes (``backend=precomputed`` reads ``file``) and the keys that change
    # each one's boxes: the cache key hashes exactly these, plus max_boxes and min_size
    BOX_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "opencv": ("mode", "resize_to", "passes", "base_k", "inc_k", "sigma", "color_spaces", "k", "min_region",
                   "strategies", "seed"),
        "selectivesearch": ("resize_to", "color_spaces", "scales", "sigma", "min_region", "seed"),
        "edgeboxes": ("resize_to", "passes", "edge_sigma", "alpha", "beta", "min_score", "edge_min_mag")}

    backend: str
    mode: str
    resize_to: int | list | None
    passes: list[dict] | None
    base_k: int
    inc_k: int
    sigma: float
    color_spaces: list[str]
    k: list[int]
    min_region: int
    strategies: list[str]
    seed: int
    max_boxes: int | None
    min_size: float
    file: str | None
    export: str | None
    split: str | None
    scales: list[int] | None
    edge_sigma: float | None
    alpha: float | None
    beta: float | None
    min_score: float | None
    edge_min_mag: float | None

    def validate(self) -> None:
        self.choice("backend", (*self.BOX_KEYS, "precomputed"))
        self.choice("mode", ("fast", "quality", "single", "custom"))
        if self.backend == "selectivesearch" and not self.scales:
            raise UserError("proposals.backend=selectivesearch needs proposals.scales (Felzenszwalb k values)")

    def runs(self) -> list["ProposalsSettings"]:
        """The settings of each pass (these without ``passes`` when there are none), checked."""
        return [type(self).from_cfg({**vars(self), "passes": None, **p}) for p in self.passes or [{}]]


@dataclasses.dataclass(frozen=True)
class PretrainSettings(GroupSettings):
    """``configs/pretrain/default.yaml``."""

    GROUP: ClassVar[str] = "pretrain"
    TUPLES: ClassVar[tuple[str, ...]] = ("sizes", "lr_steps", "iteration_lr_steps")

    enabled: bool
    source: str
    train_split: str | None
    val_split: str | None
    image_folder: str | None
    sizes: tuple[int, ...]
    crop_context: float
    pool: str
    background_crops: bool
    background_per_image: int
    scale_jitter: float
    channel_shuffle: bool
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    lr_steps: tuple[int, ...]
    lr_gamma: float
    momentum: float
    weight_decay: float
    init: str
    windows_per_image: int
    fg_fraction: float
    fg_iou: float
    iterations: int
    frozen_convs: int
    iteration_lr_steps: tuple[int, ...]
    window_proposals: dict | None
    start_from: str | None
    log_every: int

    def validate(self) -> None:
        self.choice("source", ("voc_crops", "image_folder", "windows", "crops+windows"))
        self.choice("pool", ("image", "object"))
        self.choice("optimizer", OPTIMIZERS)
        self.choice("init", ("kaiming", "default"))


@dataclasses.dataclass(frozen=True)
class TestTimeSettings(GroupSettings):
    """What eval and detect both set: the model file, the test scales and the test procedure."""

    TUPLES: ClassVar[tuple[str, ...]] = ("scales",)

    checkpoint: str | None
    scales: tuple[int, ...] | None
    max_size: int | None
    score_thresh: float
    scorer: str
    nms_iou: float
    max_per_image: int
    bbox_reg: bool
    precision: str
    fc_rank: list[int] | None
    runtime: str
    processes: int

    def validate(self) -> None:
        self.choice("scorer", SCORERS)
        if self.processes < 1:
            raise UserError(f"{self.GROUP}.processes must be 1 or more, not {self.processes}")
        self.choice("precision", PRECISIONS)
        self.choice("runtime", ("torch", "onnxruntime"))
        if self.runtime == "onnxruntime" and (self.precision != "fp32" or self.fc_rank):
            raise UserError(f"{self.GROUP}.runtime=onnxruntime runs the exported fp32 graphs: {self.GROUP}.precision "
                            f"must be fp32 and {self.GROUP}.fc_rank null (got {self.precision}, {self.fc_rank}); "
                            f"export the truncated SVD instead: spp-det export export.fc_rank=[R6,R7]")


@dataclasses.dataclass(frozen=True)
class EvalSettings(TestTimeSettings):
    """``configs/eval/default.yaml``."""

    GROUP: ClassVar[str] = "eval"

    compare_bbox_reg: bool
    results_dir: str | None
    window_batch: int
    coco: bool
    similar_classes: list[list[str]] | None


@dataclasses.dataclass(frozen=True)
class DetectSettings(TestTimeSettings):
    """``configs/detect/default.yaml`` (its test-time keys default to eval's by interpolation there)."""

    GROUP: ClassVar[str] = "detect"
    TUPLES: ClassVar[tuple[str, ...]] = ("scales", "format")

    source: str
    output: str | None
    format: tuple[str, ...]
    classes: list[str] | None
    max_pixels: int
    strict: bool
    labelstudio_url: str | None
    labelstudio_root: str | None

    def validate(self) -> None:
        super().validate()
        if self.labelstudio_url and self.labelstudio_root:
            raise UserError("detect.labelstudio_url and detect.labelstudio_root: give one of them (a URL prefix the "
                            "images are served under, or Label Studio's local-files document root)")


@dataclasses.dataclass(frozen=True)
class ExportSettings(GroupSettings):
    """``configs/export/default.yaml``."""

    GROUP: ClassVar[str] = "export"

    checkpoint: str | None
    output: str
    opset: int
    verify: bool
    fc_rank: list[int] | None


@dataclasses.dataclass(frozen=True)
class BenchSettings(GroupSettings):
    """``configs/bench/default.yaml``."""

    GROUP: ClassVar[str] = "bench"
    TUPLES: ClassVar[tuple[str, ...]] = ("scales_one", "scales_five", "precisions")

    root: str
    year: int | None
    split: str
    num_images: int
    windows: int
    rcnn_windows: int
    rcnn_batch: int
    rcnn_context: float
    rcnn_input: int
    scales_one: tuple[int, ...]
    scales_five: tuple[int, ...]
    output: str
    proposals: bool
    profile: bool
    precisions: tuple[str, ...]
    fc_rank: list[int] | None
    onnxruntime: bool


class _Group:
    """A ``RunSettings`` attribute named after a config group: its typed settings, read on first use
    (``cls``: the settings class, or ``"module:Class"`` for svm's and synth's, which live with their code)."""

    def __init__(self, cls):
        self.cls = cls

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, run, owner=None):
        if self.name not in run.__dict__:
            module, _, name = str(self.cls).partition(":")
            cls = getattr(importlib.import_module(module), name) if name else self.cls
            run.__dict__[self.name] = cls.from_cfg(run.cfg[self.name])
        return run.__dict__[self.name]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A run's settings: the top-level keys of ``configs/config.yaml``, typed, and each group's settings
    (``run.data``, ``run.proposals``, ...: read once, on first use); ``cfg``: the composed config itself
    (what settings keys hash, ``spp_det.stages.declare``; what model.pt stores)."""

    data, model, proposals, pretrain, finetune, bboxreg, eval, detect, export, bench, svm, synth = map(_Group, (
        DataSettings, ModelSettings, ProposalsSettings, PretrainSettings, FinetuneSettings, BboxregSettings,
        EvalSettings, DetectSettings, ExportSettings, BenchSettings, "spp_det.heads.svm:SVMSettings",
        "spp_det.data.synth:SynthSettings"))

    cfg: Any
    stage: str
    name: str
    device: str
    seed: int
    num_workers: int
    allow_random_backbone: bool
    work_dir: str
    cache_dir: str
    conv5_cache: bool
    # the keys the command line set (the CLI fills it: ``data.classes``, ``data`` for ``data=synth``);
    # None for a config passed whole (scripts, tests): then every key counts as given
    command_line: tuple[str, ...] | None

    @classmethod
    def of(cls, cfg) -> "RunSettings":
        """``cfg`` when it already is a ``RunSettings``, else the composed config read into one."""
        if isinstance(cfg, cls):
            return cfg
        names = [f.name for f in dataclasses.fields(cls) if f.name != "cfg"]
        values = {n: plain(cfg[n]) for n in names}
        return cls(cfg, **{**values, "command_line": as_tuple(values["command_line"])})

    def given(self, *keys: str) -> bool:
        """Whether the command line sets any of ``keys`` (always, for a config passed whole)."""
        return self.command_line is None or bool(set(keys) & set(self.command_line))


# the groups read into settings here (svm: spp_det.heads.svm.SVMSettings; synth: spp_det.data.synth.SynthSettings)
GROUPS: dict[str, type[GroupSettings]] = {cls.GROUP: cls for cls in (
    DataSettings, ModelSettings, ProposalsSettings, PretrainSettings, FinetuneSettings, BboxregSettings, EvalSettings,
    DetectSettings, ExportSettings, BenchSettings)}


def check_groups(cfg, groups: typing.Iterable[str] | None = None) -> None:
    """Read every group of ``cfg`` that has settings here (or those of ``groups``): a stage's
    settings are checked before it does any work."""
    for group in GROUPS if groups is None else groups:
        if group in GROUPS and group in cfg:
            GROUPS[group].from_cfg(cfg[group])
