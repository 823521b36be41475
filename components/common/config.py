"""The one typed configuration object, passed down section by section.

Every section refuses unknown keys, so a typo in ``pipeline.yaml`` fails loudly instead of being
silently ignored. Defaults live on the fields; ``docs/decisions.md`` explains the non-obvious ones.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from components.common.errors import ConfigError


def _numeric_only(annotation: Any) -> bool:
    """Whether a field takes numbers but not booleans (``int``, ``float``, numeric literals)."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        values = get_args(annotation)
        return not any(isinstance(v, bool) for v in values) and any(
            isinstance(v, int | float) for v in values
        )
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        return bool not in args and any(_numeric_only(a) for a in args)
    return False


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `--set train.batch_size=true` must not mean 1.
        # Strict types would also refuse what YAML writes as text (1e-3), so only booleans go.
        if isinstance(value, bool) and _numeric_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return value


class DataConfig(_Section):
    """Which files count as images and how to split a folder that has no splits."""

    extensions: tuple[str, ...] = (
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0, lt=0.5)
    # Symbolic links that lead out of the data folder stop the scan unless this is true: files
    # outside the folder are not part of the dataset anyone reviewed.
    follow_external_links: bool = False
    # Name used for the Prefect run, the MLflow experiment and the registered model.
    name: str | None = None


class ValidationConfig(_Section):
    """What makes a file usable and a dataset trainable."""

    min_width: int = Field(16, ge=1)
    min_height: int = Field(16, ge=1)
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO")
    min_images_per_class: int = Field(5, ge=1)
    # Above this share of rejected files the dataset is considered broken, not just dirty.
    max_bad_fraction: float = Field(0.2, ge=0, le=1)
    # Pillow's decompression-bomb guard stays on; this is the pixel count it trips at.
    max_image_pixels: int = Field(89_478_485, ge=1)
    # Near-duplicates (re-encoded, resized or cropped copies; docs/benchmarks.md): candidates are
    # each image's nearest neighbours by cosine similarity of the cached head features, confirmed
    # by a perceptual hash computed for candidates only. Where the pipeline drew the splits (a
    # folder of class folders), each group of near-copies of one label moves whole into one split;
    # a held-out copy of another split's image that no group holds (the user's splits, a label
    # conflict, a group at its size limit) is quarantined from the held-out side.
    near_duplicates: bool = True
    near_duplicate_regroup: bool = True  # False: quarantine held-out copies, move nothing
    # Images a group may hold: the copies of one thing (a photo's edits, one object's exposures:
    # magnetic tiles come in groups of up to six). Beyond it pairs chain distinct look-alikes.
    near_duplicate_group_max: int = Field(8, ge=2)
    near_duplicate_min_cosine: float = Field(0.6, ge=-1, le=1)
    near_duplicate_neighbours: int = Field(5, ge=1)  # candidates per image, at most
    near_duplicate_hash: Literal["phash", "dhash"] = "phash"
    # Hamming bits of the 64-bit hash: a crop moves the hash (up to ~18 bits) but keeps the features
    # close, a half-size copy moves the features (cosine down to ~0.6) but not the hash, and two
    # different photos of one scene are far in one or the other; so a pair with cosine at least
    # near_duplicate_close_cosine may differ by near_duplicate_max_distance bits, any other
    # candidate by near_duplicate_far_distance (docs/benchmarks.md).
    near_duplicate_close_cosine: float = Field(0.8, ge=-1, le=1)
    near_duplicate_max_distance: int = Field(18, ge=0, le=64)
    near_duplicate_far_distance: int = Field(8, ge=0, le=64)
    # Images with a shorter side below this are not searched: they hold too little detail for a
    # hash to tell a copy from another sample of the class (32 px handwritten digits of one class
    # agree to within 2-6 of 64 bits), so any verdict on them would be a guess.
    near_duplicate_min_side: int = Field(48, ge=1)
    near_duplicate_block: int = Field(1024, ge=1)  # rows per block of the similarity product
    near_duplicate_sheet_pairs: int = Field(16, ge=0)  # pairs on the contact sheet


class SimilarityConfig(_Section):
    """How similarity to the backbone's source domain is measured."""

    sample_size: int = Field(128, ge=8)
    # Images per batch of the moments pass; None sizes it to the device (features.extraction_batch).
    batch_size: int | None = Field(None, ge=1)
    # Scale (in nats of mean symmetric KL) at which the BN-statistics score falls to 1/e.
    kl_scale: float = Field(1.5, gt=0)
    bootstrap_rounds: int = Field(200, ge=0)
    # A stored domain profile (the profile/ folder saved with every trained model) to compare the
    # images with; a base model trained by this pipeline brings its own when this is unset.
    profile: Path | None = None
    # Scale of the profile's MMD² at which its score falls to 1/e, and its weight in the
    # combined score (a weighted geometric mean with the BatchNorm score).
    mmd_scale: float = Field(0.05, gt=0)
    profile_weight: float = Field(0.5, ge=0, le=1)


class StrategyConfig(_Section):
    """The size x similarity judgement and its thresholds."""

    case: Literal["auto", 1, 2, 3, 4] = "auto"
    # "Large" means enough images per class to move every weight without overfitting.
    large_images_per_class: int = Field(1000, ge=1)
    similar_threshold: float = Field(0.5, ge=0, le=1)
    # Case 2: cut after this block index (0-based) of the backbone; None = measured by probing.
    cut_block: int | None = None
    # Budgeted verification: also train the runner-up case (frozen <-> fine-tuned) on a nested
    # split of the training data and keep the better. "auto" runs it whenever its committed cost
    # (the frozen case plus the fine-tune up to its first comparison, verify_rung_fraction of its
    # epochs) fits the budget: verify_budget_share of the full fine-tune it could unlock, at least
    # verify_budget_s and at most verify_budget_max_s. "on" runs it regardless.
    verify: Literal["off", "on", "auto"] = "auto"
    verify_budget_s: float = Field(120.0, ge=0)
    verify_budget_share: float = Field(0.5, ge=0)
    verify_budget_max_s: float = Field(3600.0, ge=0)
    # From this share of its epochs on, the fine-tuned side stops as soon as it is clearly behind
    # or clearly ahead of the frozen side (by verify_margin_se standard errors).
    verify_rung_fraction: float = Field(0.34, gt=0, le=1)
    verify_fraction: float = Field(0.2, gt=0, lt=0.5)  # share of training images held out
    # The runner-up replaces the rule's case only if it wins on the nested split by more than this
    # many standard errors of the accuracy difference (noise on a small held-out set is no win).
    verify_margin_se: float = Field(1.0, ge=0)
    # Inside that margin the check is a tie. "rule" keeps the rule's case. "finetune_when_different"
    # (the default) takes the fine-tuned case when it scored at least as well and the data is
    # unlike the source: a frozen cut of another domain is the weaker prior there, and the nested
    # split's fewer images understate a fine-tune (see docs/decisions.md). Similar data keeps the
    # rule's case either way: a few hundred images rarely fine-tune past ImageNet features.
    verify_ties: Literal["rule", "finetune_when_different"] = "finetune_when_different"
    # A retrain keeps the last successful run's verdict (same configuration, same rule case) while
    # at most this share of files changed since; 0 verifies every run, as --force does.
    verify_reuse_max_change: float = Field(0.1, ge=0, le=1)
    # Input resolution (train.image_size: auto): frozen cases probe the rule's size and the native
    # one on a stratified sample of at most this many training images and keep the better (the
    # cheaper within noise); fine-tuned cases take the largest size whose estimated fine-tune fits
    # finetune_budget_s. "rule" skips the measurement and keeps the rule of thumb.
    resolution: Literal["measure", "rule"] = "measure"
    resolution_sample_images: int = Field(1000, ge=20)
    finetune_budget_s: float = Field(1800.0, ge=0)


class TrainConfig(_Section):
    """How the chosen case is trained."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int | Literal["auto"] = "auto"
    batch_size: int = Field(32, ge=1)
    # Frozen heads: L2-penalised softmax regression, the penalty chosen by this many stratified
    # folds of the training split (fewer when the rarest class has fewer images).
    head_cv_folds: int = Field(5, ge=2)
    # Weigh every class alike in the training loss (frozen heads and fine-tunes): "auto" does so
    # when the largest class has more than 10x the training images of the smallest.
    class_weights: Literal["auto", "on", "off"] = "auto"
    finetune_epochs: int = Field(8, ge=1)
    finetune_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(2, ge=0)
    # Frozen-feature pass: auto = ONNX Runtime on CPU (about 2x faster), PyTorch bf16 on CUDA.
    feature_engine: Literal["auto", "onnxruntime", "torch"] = "auto"
    # Case 4 falls back to random initialisation when pre-trained fine-tuning scores below this.
    success_accuracy: float = Field(0.8, ge=0, le=1)
    # Fine-tuning processes; auto = one per CUDA GPU when there are several, else 1.
    processes: int | Literal["auto"] = "auto"
    # A retrain continues from the last successful run's fine-tuned weights (same case, classes,
    # input size and configuration) for warm_start_epochs at warm_start_lr_factor x the learning
    # rates, while at most this share of files changed since the last full fine-tune; 0 always
    # starts from the pre-trained weights, as --force does (docs/decisions.md).
    warm_start_max_change: float = Field(0.25, ge=0, le=1)
    warm_start_epochs: int = Field(1, ge=1)
    warm_start_lr_factor: float = Field(0.1, gt=0, le=1)


class ExportConfig(_Section):
    """ONNX export and its parity check against PyTorch."""

    # 18 is the lowest opset the torch.export-based exporter writes without a lossy conversion.
    opset: int = Field(18, ge=18)
    atol: float = Field(1e-3, gt=0)
    parity_batch: int = Field(16, ge=1)
    # Also export (and register beside model.onnx) a graph that takes uint8 NHWC RGB images at the
    # model's size and normalises inside, for clients that cannot reproduce the float input.
    embed_preprocessing: bool = False


class TrackingConfig(_Section):
    """MLflow tracking and registry (SQLite under the output folder unless overridden), and the
    promotion gate that decides when a new version becomes ``champion`` (docs/deployment.md)."""

    # "model_name" is a field here, not pydantic's reserved model_* namespace.
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    tracking_uri: str | None = None
    experiment: str = "transfer-pipeline"
    # Registered model name; None derives it from the data folder (generic names such as
    # train/ or data/ skipped). Letters, digits, '.', '_' and '-' only.
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    # auto: the gate decides; never: champion never moves; force: the new version becomes champion.
    promote: Literal["auto", "never", "force"] = "auto"
    # Accuracy floor for any champion; never below chance (1 / classes) + 0.1 whatever is set.
    min_accuracy: float = Field(0.5, ge=0, le=1)
    # Level of the paired (exact McNemar) test behind "better" and "worse" claims.
    significance: float = Field(0.05, gt=0, lt=1)


class ServeLimits(_Section):
    """What one request may cost the model server; over-limit requests are refused (413/400).

    The memory one request can take is bounded by ``body_bytes`` plus ``decodes_in_flight`` times
    ``decoded_bytes``, whatever the files claim: both image limits are read from the header before
    a single pixel is decoded.
    """

    body_bytes: int = Field(16 * 2**20, ge=1)
    image_pixels: int = Field(40_000_000, ge=1)
    # width x height x bands x bytes per band, plus the RGB copy when the image is not RGB or grey.
    decoded_bytes: int = Field(128 * 2**20, ge=1)
    # Images in one request (multipart files, or rows of one OIP tensor).
    request_images: int = Field(32, ge=1)
    # Images decoding at once across all requests; None: two per CPU.
    decodes_in_flight: int | None = Field(None, ge=1)


class ServeConfig(_Section):
    """The model server: where it listens, how it batches, what it refuses, how it reloads."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The alias served when a model URI names no version or alias (models:/NAME).
    alias: str = "champion"
    # One ONNX Runtime call takes up to max_batch images, waiting at most max_wait_ms after the
    # oldest request for others to join it. None: the extraction engine's measured batch for the
    # model's image size and device (8 at 224 px on a CPU, 64 at 64 px or on a GPU).
    max_batch: int | None = Field(None, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    # Batches running at once, and ONNX Runtime threads each (None: the CPUs shared between them).
    batch_runners: int = Field(1, ge=1)
    inference_threads: int | None = Field(None, ge=1)
    # Threads decoding request images (None: one per CPU).
    decode_threads: int | None = Field(None, ge=1)
    # Seconds between checks of the registry alias; 0 turns hot reload off.
    reload_poll_s: float = Field(30.0, ge=0)
    limits: ServeLimits = ServeLimits()


class RunConfig(_Section):
    """Where the scan's file inspection and the embedding run: in this process, or in shards on
    a Dask cluster (each shard one Prefect task run). Workers read the data folder and write the
    feature cache under ``output_dir`` themselves, so a remote cluster must see both at the same
    paths (a shared file system)."""

    # local: this process, as always. dask: a Dask LocalCluster started for the run (dask_workers
    # single-threaded worker processes). dask:tcp://HOST:PORT: the scheduler of a running cluster.
    task_runner: str = "local"
    # LocalCluster workers for task_runner=dask; None: one per CPU this process may use.
    dask_workers: int | None = Field(None, ge=1)
    # Files per scan shard and images per embedding shard (rounded up to whole batches).
    shard_images: int = Field(1024, ge=1)
    # Where features, exported backbone graphs, scan results and measured training rates are
    # cached; None: OUTPUT_DIR/cache. Everything in it is keyed by content, backbone and size, so
    # several output folders on one machine may share one (none of it changes a result).
    cache_dir: Path | None = None

    @field_validator("task_runner")
    @classmethod
    def _known_runner(cls, value: str) -> str:
        if value in ("local", "dask") or re.fullmatch(r"dask:(tcp|tls)://[^\s/:]+:\d{1,5}", value):
            return value
        raise ValueError("expected local, dask or dask:tcp://HOST:PORT (a Dask scheduler)")


class PipelineConfig(_Section):
    """The root object: one section per stage, plus what they share."""

    backbone: str = "efficientnet_lite0"
    # A local weights file for backbones that do not ship their own (never fetched from a hub).
    backbone_weights: Path | None = None
    seed: int = 0
    output_dir: Path = Path("transfer-runs")
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    strategy: StrategyConfig = StrategyConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    run: RunConfig = RunConfig()


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message} (got {e.get('input')!r})")
    return "; ".join(lines)


def build_config(values: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a plain mapping into a ``PipelineConfig``, naming any bad key in the error."""
    try:
        return PipelineConfig.model_validate(values or {})
    except ValidationError as err:
        raise ConfigError(f"invalid configuration: {_describe(err)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; an unreadable, non-UTF-8 or malformed file is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
            f"offset {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _apply_override(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"override key {dotted!r} has an empty part; write e.g. train.device")
    node = values
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"cannot set {dotted}: {section} is already set to {child!r}, not a section"
            )
        node = child
    node[parts[-1]] = value


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read ``pipeline.yaml`` (if given) and apply dotted-key overrides such as ``train.device``."""
    values = _read_yaml(Path(path)) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        _apply_override(values, dotted, value)
    return build_config(values)


def dump_config(cfg: PipelineConfig) -> str:
    """The resolved configuration as YAML, for logging with every run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
