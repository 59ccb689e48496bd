"""Typed configuration: nested dataclasses, YAML presets, dotted ``a.b=value`` overrides.

Every section is a dataclass with defaults; a preset (``ray_ssl/presets/<name>.yaml`` or a path)
overrides some fields, and command-line overrides such as ``train.num_workers=2`` override the
preset. An unknown key or a value of the wrong type raises :class:`ConfigError`, a one-line message
naming the key and the valid choices.

Methods are plug-ins: ``ray_ssl/methods/<name>_settings.py`` registers a :class:`MethodPlugin`
(its settings dataclass, how its views follow from the user's, its checkpoint-shape keys and where
its torch implementation lives), and its settings are the config section ``<name>`` (``franca.
koleo_weight=0.2``). This floor finds those modules by file name; they import nothing but this
module and the standard library (``tests/test_layers.py``), so resolving a config never imports
torch, DeepSpeed or Ray.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ray_ssl.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
METHODS_PACKAGE = "ray_ssl.methods"
METHODS_DIR = Path(__file__).parent / "methods"
SETTINGS_SUFFIX = "_settings"  # ray_ssl/methods/<name>_settings.py registers method <name>


class ConfigError(UserError, ValueError):
    """A configuration problem; the message is one line naming the key and what is valid."""


@dataclass
class StorageConfig:
    """Where object storage lives. Credentials come only from the standard AWS chain."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, else AWS
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION
    connect_retries: int = 3  # attempts per S3 request (botocore) before it is an error
    connect_timeout_s: float = 5.0
    # Wall-clock limit of one S3 request, its retries included; also bounds one stalled read.
    request_deadline_s: float = 120.0


@dataclass
class ShardsConfig:
    """How `ray-ssl shards write` builds a shard set."""

    source: str = "fashion-mnist"  # fashion-mnist | digits | folder:PATH | synthetic
    split: Literal["train", "test"] = "train"
    samples_per_shard: int = 2000
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = 90
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    synthetic_count: int = 1000
    synthetic_size: int = 64
    seed: int = 0  # synthetic images and same-class partners
    # Semantic partners (arXiv 2510.08722) written into every sample: none, another image of its
    # class drawn from the labels (same-class), or those of pairs_file (key,partner_key rows).
    pairs: Literal["none", "same-class"] = "none"
    pairs_file: str | None = None
    max_samples: int | None = None  # only the source's first N samples (a subset); None = all


@dataclass
class ViewConfig:
    """What the data pipeline produces per sample: the method's view spec."""

    kind: Literal["multicrop", "pair", "single"] = "multicrop"
    global_crops: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)  # Franca / DINOv2 default
    local_crops: int = 8
    local_size: int = 98
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # first global crop, second global crop (DINO)
    local_blur_p: float = 0.5
    solarize_p: float = 0.2  # second global crop only (DINO)
    mask: Literal["none", "block", "inverse_block", "cyclic"] = "none"
    mask_ratio: tuple[float, float] = (0.1, 0.65)  # Franca sec. 4: ratios in [0.1, 0.65]
    mask_sample_p: float = 0.5  # exactly int(p x global crops of a batch) are masked (Franca)
    patch_size: int = 14
    channels: int = 3
    # Positive pairs of a pair view: two augmentations of one image (augment), two images of one
    # class (semantic: the set's partners, arXiv 2510.08722), or the partner with p=semantic_p.
    positives: Literal["augment", "semantic", "mixed"] = "augment"
    semantic_p: float = 0.5


@dataclass
class DataConfig:
    """The streaming pipeline from a shard set to the Train workers."""

    uri: str = "data/shards/fashion-mnist/train"
    eval_uri: str | None = None  # labelled held-out shards for online kNN
    reader: Literal["blocks", "ray_webdataset"] = "blocks"
    batch_size: int = 64  # global batch, split evenly over train workers
    shuffle_seed: int = 0
    # Rows each Train worker buffers and draws its batches from at random (webdataset's
    # shuffle(n)), mixing shards; 0 = batches in arrival order (a shard at a time). Costs
    # shuffle_buffer decoded samples of memory per worker. See ray_ssl/data/row_pool.py.
    shuffle_buffer: int = 0
    # A pass stops (CorruptDataError) once its corrupt samples exceed this fraction of the
    # pass's size (the manifest's count): a count, never a running rate, since bad samples
    # cluster by shard. Under the limit overall a run never stops; over it, as soon as the count
    # is over (each worker on its own count, and the workers' counts summed at a pass's end).
    max_corrupt_fraction: float = 0.01
    decode_concurrency: int | None = None  # Ray Data tasks/actors for decode+views; None = auto
    prefetch_batches: int = 2  # blocks each Train worker's iterator reads ahead of training


VIT_BACKBONE = "vit"  # a method's backbone setting naming the model section's ViT (else timm)


@dataclass
class ModelConfig:
    """The ViT backbone (timm)."""

    arch: Literal["tiny", "small", "base", "large", "giant"] = "tiny"
    depth: int | None = None  # blocks; None = the arch's (12/12/12/24/40); fewer for CPU runs
    patch_size: int = 14
    img_size: int = 224
    in_chans: int = 3
    num_registers: int = 0
    drop_path: float = 0.0  # stochastic depth of the student (the teacher has none, as DINOv2)
    drop_path_uniform: bool = True  # same rate in every block (DINOv2); else linear 0 -> drop_path
    layerscale: float | None = 1.0e-5  # LayerScale init; None disables it
    act_checkpointing: bool = False


@dataclass
class OptimConfig:
    """The optimizer (AdamW, SGD or LARS) and its schedules."""

    base_lr: float = 4.0e-3  # at lr_reference_batch; scaled to the global batch by lr_scaling
    lr_reference_batch: int = 1024
    lr_scaling: Literal["sqrt", "linear"] = "sqrt"  # DINOv2 sqrt_wrt_1024; linear: SimCLR/VICReg
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 3.0
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    lr_milestones: tuple[int, ...] = ()  # step decay epochs (InstDisc); empty = lr_schedule
    # After the warm-up: "cosine" from the peak to min_lr, or "constant" at the peak
    # (lemniscate cifar.py, whose adjust_learning_rate call is commented out).
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_gamma: float = 0.1
    momentum_sgd: float = 0.9  # momentum of SGD and LARS
    name: Literal["adamw", "sgd", "lars"] = "adamw"


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed: scaling, schedule length, checkpoints, failures."""

    method: str = "franca"  # a registered method (ray_ssl/methods/<name>_settings.py)
    num_workers: int = 1  # the most workers; the size of a fixed-size run
    min_workers: int | None = None  # elastic: run on min_workers..num_workers (None = fixed)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None  # intra-op threads per worker; None = cpus_per_worker
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    epochs: int = 1
    steps_per_epoch: int | None = None  # None = dataset size // batch size
    checkpoint_every: int = 50  # steps; the last step always checkpoints
    keep_checkpoints: int = 2
    # Ray Train restarts failed workers from the latest checkpoint this many times (-1: always).
    # 3: a node lost or a worker killed (out of memory, a dead bank shard) costs the steps since
    # the last checkpoint, not the run; an input error is not retried (train/input_errors.py).
    max_failures: int = 3
    run_name: str = "ray-ssl"
    storage_path: str = "ray_results"  # local dir or s3://bucket/prefix (shared across nodes)
    seed: int = 0
    log_every: int = 10  # steps between metric reports


@dataclass
class EvalConfig:
    """Online and final evaluation."""

    knn_every: int = 100  # steps; 0 disables online kNN
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_uri: str | None = None  # labelled kNN memory shards; None = data.uri
    knn_max_train: int = 10000  # labelled samples used as the kNN memory
    knn_max_test: int = 2000  # held-out queries from data.eval_uri
    feature_batch_size: int = 256  # images per backbone forward when extracting features
    # `ray-ssl eval EXPORT`: knn_max_train / knn_max_test samples of --data / --eval-data.
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO/DINOv2 eval_knn
    # DINOv2's linear sweep (eval/linear.py), each scaled by batch x workers / 256
    linear_lrs: tuple[float, ...] = (
        1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1
    )  # fmt: skip
    linear_epochs: int = 100  # ~3.6k SGD steps on 9k rows (DINOv2: 12.5k on ImageNet)
    linear_batch_size: int = 256
    linear_holdout: float = 0.1  # fraction of the training split that picks the best head
    linear_workers: int = 1  # Ray Train workers of the probe
    pca_images: int = 8  # test images in the PCA picture grid
    output_uri: str | None = None  # None: <run>/eval for a run's export, else beside the export


@dataclass
class RasaConfig:
    """RASA (Franca arXiv 2507.14137 sec. 3.3): the recipe of valeoai/Franca rasa_franca.yml."""

    rounds: int = 9  # T: one plane (2 directions) removed per round
    epochs: int = 5  # per round
    steps_per_epoch: int | None = None  # None = one pass over data.uri
    batch_size: int = 128  # images per step
    lr: float = 2.0e-4  # AdamW, cosine to min_lr within each round
    min_lr: float = 0.0
    weight_decay: float = 0.0
    # Stream one epoch through the frozen backbone and reuse its tokens in every round and epoch
    # (the reference draws new views each epoch; this saves rounds x epochs - 1 forward passes;
    # it holds steps_per_epoch x batch_size x patches x D floats in the worker's memory).
    cache_tokens: bool = False
    probe_images: int = 1000  # images whose patch tokens fit / test the closed-form affine probe
    seed: int = 0


@dataclass
class CurationConfig:
    """Hierarchical k-means curation (arXiv 2405.15613)."""

    # The shard set curated is data.uri (written from the shards section when missing).
    embeddings_uri: str = "data/curation/embeddings"
    output_uri: str = "data/curation/curated"
    backbone: str = "pixels"  # "pixels", a timm name, or a path to an exported safetensors file
    # An exported backbone (.safetensors) to embed with instead of `backbone` when the file
    # exists (e.g. the export of a local training run); "" = always `backbone`.
    backbone_export: str = ""
    pixels_size: int = 16  # "pixels": images area-downsampled to this side, then flattened
    timm_pretrained: bool = True  # a timm name: load its pretrained weights (needs the hub)
    embed_batch_size: int = 256
    embed_concurrency: int = 2  # CPU embedding actors; with GPUs, one actor per GPU
    embed_num_gpus: int | None = None  # GPU actors (one GPU each); None = the cluster's GPUs
    # One entry per level (level 1 first). n_resampling_steps counts the steps after the first
    # k-means (the reference's n_resampling_steps counts that first run too).
    n_clusters: tuple[int, ...] = (100, 20)
    n_resampling_steps: tuple[int, ...] = (2, 2)
    sample_size: tuple[int, ...] = (10, 5)
    # Empty, or one entry per level: > 1 splits every cluster of the level into at most that many
    # (the reference reaches 10M level-1 clusters as 100k x 100); not with resampling.
    n_splits: tuple[int, ...] = ()
    resample_strategy: Literal["closest", "random"] = "closest"
    # k-means seeding: "kmeans||" (Bahmani et al., VLDB 2012: init_rounds passes over the data,
    # init_oversampling * k expected candidates each; scales on Ray) or "kmeans++" (the
    # reference's greedy k-means++: k sequential passes)
    init: Literal["kmeans||", "kmeans++"] = "kmeans||"
    init_rounds: int = 5
    init_oversampling: float = 0.5  # l = k/2 (ray_ssl.curation.hkmeans.PARALLEL_OVERSAMPLING)
    # k-means|| seeds on a uniform subsample of about this many points per cluster (0: all)
    init_points_per_cluster: int = 32
    n_init: int = 10  # k-means runs per cluster when splitting (n_splits); the best is kept
    lloyd_iterations: int = 20
    target_size: int = 10000
    leaf_selection: Literal["random", "closest"] = "random"
    write_shards: bool = False
    num_partitions: int = 4  # object-store blocks of the points (one Ray task each per pass)
    driver_max_points: int = 50000  # smaller point sets are clustered in the driver process
    flat_baseline: bool = True  # report flat k-means with each level's k for comparison
    # Compare the curated sample with a random subset of the same size and a balanced sample from
    # one flat k-means with level 1's k (over the classes, when labelled, and every level's
    # clusters); costs one more k-means unless flat_baseline runs it anyway.
    sample_baselines: bool = True
    # > 0: curate a long-tailed subsample of a labelled pool: the class of (seeded random) rank r
    # keeps a fraction (r + 1)^-exponent of its samples (a Zipf profile over the classes).
    pool_zipf_exponent: float = 0.0
    seed: int = 0


@dataclass
class Config:
    """The whole resolved configuration of a run; saved with every run and checkpoint."""

    preset: str = "local"
    storage: StorageConfig = field(default_factory=StorageConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    rasa: RasaConfig = field(default_factory=RasaConfig)
    # Every registered method's settings by method name (section ``<name>`` of presets, overrides
    # and saved configs); ``config.<name>`` reads one.
    methods: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods") or {}
        if name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    @property
    def method_settings(self) -> Any:
        """The settings of the method this config trains (``train.method``)."""
        return self.methods[self.train.method]


def _no_settings_check(settings: Any) -> None:
    """Default of :attr:`MethodPlugin.check_settings`: nothing beyond the field types."""


@dataclass(frozen=True)
class MethodPlugin:
    """What the configuration layer knows of a method; registered by its settings module.

    ``view_spec(config)`` returns the views the method trains on, derived from ``config.views``;
    a user setting the method cannot honour raises a one-line :class:`ConfigError` (it is never
    overridden silently). ``check_settings`` validates the method's own section when a config is
    loaded; ``view_spec`` runs when a run is planned, since configs that do not train (curation,
    shard writing) need not suit the default method.
    """

    name: str
    settings: type  # the dataclass of section ``name``
    implementation: str  # "module:Class" of its Method; imported only where training happens
    view_spec: Callable[[Config], ViewConfig]
    shape_keys: tuple[str, ...] = ()  # settings that fix the shapes of its checkpoints
    check_settings: Callable[[Any], None] = _no_settings_check


_PLUGINS: dict[str, MethodPlugin] = {}


def register_method(plugin: MethodPlugin) -> MethodPlugin:
    """Add a method to the registry (called by ``ray_ssl/methods/<name>_settings.py``)."""
    if not dataclasses.is_dataclass(plugin.settings):
        raise TypeError(f"method {plugin.name!r}: settings must be a dataclass")
    _PLUGINS[plugin.name] = plugin
    return plugin


def method_plugins() -> dict[str, MethodPlugin]:
    """Every registered method by name; imports the methods' settings modules on first use."""
    for module in pkgutil.iter_modules([str(METHODS_DIR)]):
        if module.name.endswith(SETTINGS_SUFFIX):
            importlib.import_module(f"{METHODS_PACKAGE}.{module.name}")
    return dict(sorted(_PLUGINS.items()))


def method_plugin(name: str) -> MethodPlugin:
    """The plug-in of method ``name``; an unknown name is a one-line :class:`ConfigError`."""
    plugins = method_plugins()
    if name not in plugins:
        raise ConfigError(
            f"config key 'train.method': {name!r} is not a registered method; choose one of "
            f"{', '.join(plugins)}"
        )
    return plugins[name]


def training_views(config: Config) -> ViewConfig:
    """The views ``config``'s method trains on; a view setting it cannot honour is an error."""
    return method_plugin(config.train.method).view_spec(config)


def _choices(tp: Any) -> str:
    """A short human description of what a field accepts."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_choices(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list " + str([_choices(a) for a in typing.get_args(tp) if a is not Ellipsis])
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': {value!r} is not valid; expected {_choices(tp)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], v) for v in value)
        if len(args) != len(value):
            raise bad
        return tuple(_coerce(key, a, v) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, prefix=key + ".")
    raise bad


def _build(
    cls: type,
    values: dict[str, Any],
    prefix: str = "",
    extra_names: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
) -> Any:
    """Instantiate dataclass ``cls`` from a (possibly partial) nested dict, strictly."""
    hints = typing.get_type_hints(cls)
    accepted = {f.name for f in dataclasses.fields(cls)} - set(hidden)
    names = [*sorted(accepted, key=list(hints).index), *extra_names]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in accepted:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and f.name not in kwargs:
            setattr(obj, f.name, hints[f.name]())
    return obj


def _build_config(values: dict[str, Any]) -> Config:
    """A :class:`Config` from a nested dict whose method sections are keyed by method name."""
    plugins = method_plugins()
    sections = {
        name: _coerce(name, plugin.settings, values.get(name, {}))
        for name, plugin in plugins.items()
    }
    rest = {key: value for key, value in values.items() if key not in plugins}
    config = _build(Config, rest, extra_names=tuple(plugins), hidden=("methods",))
    config.methods = sections
    return config


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where (1-based line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_override(text: str) -> dict[str, Any]:
    """``"train.num_workers=2"`` -> ``{"train": {"num_workers": 2}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override '{text}' has no key before '='")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override '{text}': the value is not valid YAML ({_yaml_problem(err)}); quote it "
            "or fix the brackets, e.g. views.global_scale=[0.4,1.0]"
        ) from None
    for key in reversed(keys):
        value = {key: value}
    return value


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset by name (from ``ray_ssl/presets``) or by path to a YAML file."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset '{name}'; choose one of {', '.join(available_presets())} "
            "or pass a path to a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"preset file {path} is not valid YAML: {_yaml_problem(err)}; fix the file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}' must be a YAML mapping of sections")
    return data


def load_config(preset: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset plus dotted overrides into a validated :class:`Config`."""
    values: dict[str, Any] = {"preset": preset}
    values = _merge(values, load_preset(preset))
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build_config(values)
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a saved config (``to_dict`` output), validating it again."""
    config = _build_config(values)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    values = dataclasses.asdict(config)
    values.update(values.pop("methods"))  # each method's settings are the section of its name
    return plain(values)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    v, t, d, m = config.views, config.train, config.data, config.model
    method_plugin(t.method)  # a registered method
    for name, plugin in method_plugins().items():
        plugin.check_settings(config.methods[name])
    _require(t.num_workers >= 1, "train.num_workers must be >= 1")
    _require(
        t.min_workers is None or 1 <= t.min_workers <= t.num_workers,
        f"train.min_workers={t.min_workers} must be between 1 and train.num_workers="
        f"{t.num_workers} (or null for a fixed worker count)",
    )
    sizes = range(t.min_workers or t.num_workers, t.num_workers + 1)
    uneven = [n for n in sizes if d.batch_size % n]
    if uneven:
        elastic = (
            f" (an elastic run may have {sizes.start}..{sizes.stop - 1} workers; "
            f"{math.lcm(*sizes)} divides by all)"
            if len(sizes) > 1
            else ""
        )
        raise ConfigError(
            f"data.batch_size={d.batch_size} is not divisible by train.num_workers={uneven[0]}"
            f"{elastic}; pick a batch size that is a multiple of every worker count"
        )
    _require(
        t.precision != "fp16" or t.zero_stage >= 1,
        "train.precision=fp16 needs train.zero_stage >= 1 (its checkpoints are consolidated "
        "from the ZeRO optimizer); use zero_stage=1 or bf16",
    )
    _require(
        t.zero_stage in (0, 1, 2, 3),
        f"train.zero_stage={t.zero_stage} is not a DeepSpeed ZeRO stage; choose 0, 1, 2 or 3",
    )
    for name, size in (("views.global_size", v.global_size), ("views.local_size", v.local_size)):
        _require(
            size % v.patch_size == 0,
            f"{name}={size} is not divisible by views.patch_size={v.patch_size}; "
            "choose a crop size that is a multiple of the patch size",
        )
    _require(
        m.patch_size == v.patch_size,
        f"model.patch_size={m.patch_size} differs from views.patch_size={v.patch_size}; "
        "set both to the same value",
    )
    # LARS adapts each parameter's step to its own norm; ZeRO's flat partitions would mix them.
    _require(
        config.optim.name != "lars" or t.zero_stage == 0,
        f"optim.name=lars needs whole parameters, but train.zero_stage={t.zero_stage} flattens "
        "them into partitions; set train.zero_stage=0",
    )
    _require(
        v.positives == "augment" or v.kind == "pair",
        f"views.positives={v.positives} needs views.kind=pair (got {v.kind}); set views.kind=pair "
        "or views.positives=augment",
    )
    _require(0.0 <= v.semantic_p <= 1.0, f"views.semantic_p={v.semantic_p} must be within [0, 1]")
    _require(
        config.shards.pairs == "none" or config.shards.pairs_file is None,
        "shards.pairs=same-class and shards.pairs_file both choose partners; set only one",
    )
    _require(
        config.optim.lr_schedule == "cosine" or not config.optim.lr_milestones,
        f"optim.lr_schedule={config.optim.lr_schedule} and optim.lr_milestones="
        f"{list(config.optim.lr_milestones)} both set the lr after the warm-up; keep one",
    )
    lo, hi = v.mask_ratio
    _require(0.0 <= lo <= hi < 1.0, f"views.mask_ratio={list(v.mask_ratio)} must be 0<=lo<=hi<1")
    for name, (a, b) in (
        ("views.global_scale", v.global_scale),
        ("views.local_scale", v.local_scale),
    ):
        _require(0.0 < a <= b <= 1.0, f"{name}=[{a}, {b}] must satisfy 0 < lo <= hi <= 1")
    _require(
        d.prefetch_batches >= 0,
        f"data.prefetch_batches={d.prefetch_batches} must be >= 0 (0 reads no block ahead)",
    )
    _require(
        config.storage.request_deadline_s > 0 and config.storage.connect_retries >= 1,
        f"storage.request_deadline_s={config.storage.request_deadline_s} must be > 0 and "
        f"storage.connect_retries={config.storage.connect_retries} >= 1",
    )
    _require(
        0.0 <= d.max_corrupt_fraction <= 1.0,
        f"data.max_corrupt_fraction={d.max_corrupt_fraction} must be within [0, 1]",
    )
    _require(
        d.shuffle_buffer >= 0,
        f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (0 = batches in arrival order)",
    )
    c = config.curation
    _require(
        len(c.n_clusters) == len(c.n_resampling_steps) == len(c.sample_size),
        "curation.n_clusters, curation.n_resampling_steps and curation.sample_size must have "
        "one entry per level",
    )
    for level, (steps, size) in enumerate(zip(c.n_resampling_steps, c.sample_size, strict=True), 1):
        _require(
            not (steps > 0 and size == 1),
            f"curation.sample_size is 1 at level {level} with n_resampling_steps={steps}: "
            "k-means on one point per cluster is degenerate (the reference skips it); use "
            "sample_size >= 2 or n_resampling_steps 0 there",
        )
    _require(c.n_init >= 1, f"curation.n_init={c.n_init} must be >= 1")
    _require(
        c.init_rounds >= 1 and c.init_oversampling > 0,
        f"curation.init_rounds={c.init_rounds} must be >= 1 and "
        f"curation.init_oversampling={c.init_oversampling} > 0",
    )
    _require(
        c.init_points_per_cluster >= 0,
        f"curation.init_points_per_cluster={c.init_points_per_cluster} must be >= 0 "
        "(0 = seed on all points)",
    )
    _require(
        c.pool_zipf_exponent >= 0,
        f"curation.pool_zipf_exponent={c.pool_zipf_exponent} must be >= 0 (0 = the whole pool)",
    )
