"""The typed, validated view of ``params.yaml``.

``load_params()`` reads the file once and validates *every* section, so a typo
anywhere fails at the first stage that runs, not after an hour of training.
Each stage then hands its tasks only the sections it declares in ``dvc.yaml``.
Errors name the dotted key and, for choices, the valid names::

    ParamsError: params.yaml is invalid:
      resample.strategy: Input should be 'none', 'random_over', 'random_under' or 'smote'
      (got 'smtoe')

There are no defaults here on purpose: ``params.yaml`` is the only place a
number lives. The choice lists below are the keys of the factories in
``tasks/`` (a test keeps them in step); they live here so that validating
params never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

BUILTIN_SOURCES = ("digits", "fashion-mnist")
SamplerName = Literal[
    "none", "random_over", "random_under", "smote", "borderline_smote", "adasyn",
    "smote_tomek", "smote_enn", "balanced_sampler",
]  # fmt: skip
FeatureSpace = Literal["pixels", "embeddings"]
LossName = Literal["ce", "focal"]
ClassWeightName = Literal["none", "balanced", "sqrt_inv", "effective_number"]
ModelName = Literal["resnet", "cnn", "mobilenet"]  # tasks.models.MODELS: trained from scratch
# tasks.models.PRETRAINED: ImageNet weights (the whole network, or its first blocks: a student)
PretrainedName = Literal["efficientnet_lite0", "efficientnet_lite0_trunk"]
FeatureLossName = Literal["none", "attention"]
QuantizeMethod = Literal["ptq", "qat", "auto"]
ScheduleName = Literal["onecycle", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["fp32", "bf16", "fp16"]
CalibrationName = Literal["minmax", "percentile", "entropy"]
ResizeName = Literal["stretch", "pad", "center_crop"]
# augment: keys the device data path (tasks/training/device_data.py) does not implement
DEVICE_UNSUPPORTED = ("crop_p", "elastic_p", "blur_p", "hue_saturation_p")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Fraction


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds a bad value."""


class Section(BaseModel):
    """A frozen section of params.yaml that rejects unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def flat(self, prefix: str) -> dict[str, Any]:
        """``{"train.lr": 0.003, ...}``: the form MLflow params and checkpoints use."""
        return {f"{prefix}.{key}": value for key, value in self.model_dump(mode="json").items()}


class DataParams(Section):
    source: str
    fashion_mnist_dir: Path
    # auto: read off the images (tasks/data/prepare.py records them in metrics/prepare.json)
    image_size: Annotated[int, Field(ge=4, le=1024)] | Literal["auto"]
    channels: Literal[1, 3, "auto"]
    resize: ResizeName
    background: int = Field(ge=0, le=255)
    min_size: int = Field(ge=1)
    min_per_class: int = Field(ge=3)  # one image each for train, val and test at the least
    max_per_class: Annotated[int, Field(ge=3)] | None
    imbalance_ratio: float = Field(ge=1.0)
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)
    workers: Annotated[int, Field(ge=1)] | Literal["auto"]
    symlinks: Literal["inside", "follow", "skip"]  # which symlinks an ImageFolder listing follows
    max_file_mb: float = Field(gt=0.0)  # a larger file is quarantined unread
    decode_timeout_s: float = Field(gt=0.0)  # an image that takes longer is quarantined

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in BUILTIN_SOURCES or Path(value).is_dir():
            return value
        hint = (
            " (a DVC-tracked folder that is not checked out: run `dvc pull`)"
            if Path(value).with_suffix(".dvc").is_file()
            else ""
        )
        raise ValueError(
            f"must be one of {', '.join(BUILTIN_SOURCES)} or an existing ImageFolder "
            f"directory (one sub-folder per class){hint}"
        )

    @field_validator("max_per_class")
    @classmethod
    def _cap_above_floor(cls, value: int | None, info: ValidationInfo) -> int | None:
        floor = info.data.get("min_per_class")
        if value is not None and floor is not None and value < floor:
            raise ValueError(f"must not be below data.min_per_class ({floor})")
        return value


class AuditParams(Section):
    input_size: Annotated[int, Field(ge=16, le=512)] | Literal["auto"]
    batch_size: int = Field(ge=1)
    duplicate_similarity: float = Field(gt=0.0, le=1.0)
    duplicate_hash_bits: int = Field(ge=0, le=64)
    split_groups: bool
    cv_folds: int = Field(ge=2)
    label_max_probability: float = Field(gt=0.0, le=1.0)
    outlier_neighbors: int = Field(ge=1)
    outlier_z: float = Field(gt=0.0)
    blank_std: float = Field(ge=0.0)
    dark_mean: float = Field(ge=0.0, le=255.0)
    bright_mean: float = Field(ge=0.0, le=255.0)
    gallery_max: int = Field(ge=0)
    exclude: Path

    @field_validator("bright_mean")
    @classmethod
    def _bright_above_dark(cls, value: float, info: ValidationInfo) -> float:
        dark = info.data.get("dark_mean")
        if dark is not None and value <= dark:
            raise ValueError(f"must be above audit.dark_mean ({dark})")
        return value


class ResampleParams(Section):
    strategy: SamplerName
    sampling_strategy: str | float
    k_neighbors: int = Field(ge=1)
    space: FeatureSpace
    embedding_checkpoint: Path | None

    @field_validator("embedding_checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("must be null or an existing checkpoint file (a teacher .pt)")
        return value


class AugmentParams(Section):
    # auto: 0.5 on RGB data, 0 on grayscale (tasks.training.transforms.resolve_augment)
    hflip_p: Probability | Literal["auto"]
    vflip_p: Probability
    affine_p: Probability
    rotate_deg: float = Field(ge=0.0, le=180.0)
    translate_frac: float = Field(ge=0.0, le=0.5)
    scale_min: float = Field(gt=0.0)
    scale_max: float = Field(gt=0.0)
    shear_deg: float = Field(ge=0.0, le=45.0)
    crop_p: Probability
    crop_scale_min: float = Field(gt=0.0, le=1.0)
    brightness_contrast_p: Probability
    brightness_limit: Fraction
    contrast_limit: Fraction
    gamma_p: Probability
    gamma_min: float = Field(gt=0.0, le=1.0)
    gamma_max: float = Field(ge=1.0, le=5.0)
    hue_saturation_p: Probability  # colour images only
    hue_shift: float = Field(ge=0.0, le=180.0)
    saturation_shift: float = Field(ge=0.0, le=255.0)
    noise_p: Probability
    noise_std: Fraction
    blur_p: Probability
    blur_sigma_max: float = Field(gt=0.0, le=10.0)
    dropout_p: Probability
    dropout_holes: int = Field(ge=1)
    dropout_size_frac: float = Field(gt=0.0, le=1.0)
    elastic_p: Probability
    elastic_alpha: float = Field(ge=0.0)
    elastic_sigma: float = Field(gt=0.0)
    minority_boost: float = Field(ge=1.0)

    @field_validator("scale_max")
    @classmethod
    def _ordered_scale(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("scale_min", value):
            raise ValueError(f"must not be below augment.scale_min ({info.data['scale_min']})")
        return value


Keep = Literal["best", "last"]  # which epoch a fit returns (docs/training.md)


class FitParams(Section):
    """What a supervised fit needs; the teacher and the student both have it."""

    SECTION: ClassVar[str]  # its key in params.yaml, for messages

    model: ModelName | PretrainedName
    # ImageNet weights for a PRETRAINED model: the packaged file, or ``weights``.
    pretrained: bool
    weights: Path | None
    # The resolution a PRETRAINED model sees (resized on the fly from data.image_size);
    # auto: 2x the stored size (grayscale) or 3x (colour), within 32-96
    # (tasks.efficientnet.auto_input_size).
    input_size: Annotated[int, Field(ge=32, le=512)] | Literal["auto"]
    width: int = Field(ge=1)
    width_multiplier: float = Field(gt=0.0, le=8.0)  # scales every layer (MobileNet's alpha)
    # efficientnet_lite0_trunk: how many of Lite0's 16 MBConv blocks it keeps (its depth)
    trunk_blocks: int = Field(ge=1, le=16)
    dropout: float = Field(ge=0.0, lt=1.0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    schedule: ScheduleName
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    loss: LossName
    focal_gamma: float = Field(ge=0.0)
    class_weight: ClassWeightName
    class_weight_beta: float = Field(ge=0.0, lt=1.0)  # effective_number's beta
    grad_clip: float = Field(ge=0.0)  # 0 turns clipping off
    patience: int = Field(ge=1)
    # Which epoch's weights the fit returns: ``best``, the best val macro-F1 (early
    # stopping after ``patience`` epochs without a better one); ``last``, the end of
    # the schedule (no early stopping; val is watched, not used to choose).
    keep: Keep
    # Validate, select and keep an exponential moving average of the weights whose
    # weight halves every this many epochs (the decay per step follows from the steps
    # per epoch); 0: the raw weights of the best epoch.
    ema_half_life: float = Field(ge=0.0)
    # Early stopping waits for the end of the warm-up and for this many optimizer
    # steps; a small split gets more epochs than ``epochs`` so that it has them.
    min_steps: int = Field(ge=0)
    # The fit's best val macro-F1 must close this fraction of the gap between the
    # better trivial baseline (data/prepared/baselines.json) and a perfect score.
    baseline_margin: float = Field(ge=0.0, lt=1.0)
    # ...and its val accuracy must beat the largest val class's share in a binomial test
    # whose p-value, times the epochs it was chosen from, is below this.
    significance: float = Field(gt=0.0, lt=1.0)
    allow_weak: bool  # true: a model that fails that check is a loud warning, not an error
    num_workers: int = Field(ge=0)
    device: DeviceName
    precision: PrecisionName  # autocast dtype; fp16 adds loss scaling
    compile: bool  # torch.compile the training forward
    data_on_device: bool  # train split held and augmented on the device (training/device_data.py)
    deterministic: bool

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("must be null (the packaged weights) or an existing .pth file")
        return value

    @model_validator(mode="after")
    def _pretrained_has_weights(self) -> FitParams:
        section = self.SECTION
        if self.pretrained and self.model not in PretrainedName.__args__:
            raise ValueError(
                f"{section}.pretrained: true, but {section}.model {self.model!r} has no ImageNet "
                f"weights; use {section}.model: {' | '.join(PretrainedName.__args__)} "
                f"or {section}.pretrained: false"
            )
        return self


class TrainParams(FitParams):
    SECTION: ClassVar[str] = "train"

    # Transfer learning: start from these weights (a .pt path or an MLflow URI)...
    init_from: str | None
    # ...train only the head for this many epochs, then everything, the
    # backbone (``features``) at ``lr * backbone_lr_mult``.
    freeze_backbone_epochs: int = Field(ge=0)
    backbone_lr_mult: float = Field(gt=0.0, le=1.0)

    @field_validator("init_from")
    @classmethod
    def _init_from_exists(cls, value: str | None) -> str | None:
        if value is None or ":/" in value or Path(value).is_file():
            return value  # an MLflow URI (runs:/, models:/, ...) is resolved when training
        raise ValueError("must be null, an existing checkpoint (.pt) or an MLflow model URI")


class DistillParams(FitParams):
    SECTION: ClassVar[str] = "distill"

    temperature: float = Field(gt=0.0)
    alpha: float = Field(ge=0.0, le=1.0)
    feature_loss: FeatureLossName  # attention: Zagoruyko & Komodakis 2017, on top of KD
    feature_weight: float = Field(ge=0.0)  # beta of the attention-transfer term
    # >0: teacher and student see each batch mixed with itself, lam ~ Beta(mixup, mixup)
    mixup: float = Field(ge=0.0)
    # >0: the teacher's logits for that many fixed augmented views of each image, computed
    # once and cached (tasks/training/teacher_views.py); 0: the teacher runs on every batch
    teacher_views: int = Field(ge=0)
    teacher_view_cache_mb: float = Field(ge=0.0)  # the cache's bound on disk
    compare_scratch: bool  # also train the student without the teacher: kd_gain
    bootstrap_samples: int = Field(ge=10)  # test resamples of kd_gain's paired interval

    @field_validator("teacher_views")
    @classmethod
    def _views_are_plain_batches(cls, value: int, info: ValidationInfo) -> int:
        clashes = {
            "distill.mixup > 0 (a mixed batch is a new view every step)": info.data.get("mixup"),
            "distill.feature_loss (it needs the teacher's feature maps)":
                info.data.get("feature_loss") not in (None, "none"),
            "distill.data_on_device (its views are drawn on the device)":
                info.data.get("data_on_device"),
        }  # fmt: skip
        clash = [name for name, on in clashes.items() if on]
        if value > 0 and clash:
            raise ValueError(f"cached teacher views do not combine with {clash[0]}: set one to 0")
        return value


class QuantizeParams(Section):
    method: QuantizeMethod
    calibration_size: int = Field(ge=1)
    calibration_method: CalibrationName
    per_channel: bool
    keep_first_conv_fp32: bool  # ORT's int8 conv is slow on 1-3 input channels
    max_drop: float = Field(ge=0.0, le=1.0)  # auto: val f1_macro PTQ may lose before QAT runs
    qat_epochs: int = Field(ge=1)
    qat_lr: float = Field(gt=0.0)
    qat_batch_size: int = Field(ge=2)


class StudentBudget(Section):
    """What the shipped int8 student may cost, checked beside the compression targets."""

    max_int8_bytes: int = Field(ge=1)  # the int8 ONNX file
    # int8 single-image latency / the teacher's at its fastest fp32 runtime, same run
    max_latency_ratio_b1: float = Field(gt=0.0)


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    num_threads: int = Field(ge=1)
    latency_warmup: int = Field(ge=0)
    latency_repeats: int = Field(ge=1)
    logit_adjust_tau: float = Field(ge=0.0)
    top_k: int = Field(ge=1)
    calibration_bins: int = Field(ge=2)
    temperature_scaling: bool
    bootstrap_samples: int = Field(ge=10)
    robustness: bool
    grad_cam_examples: int = Field(ge=0)  # per kind (correct, misclassified); 0: none
    adversarial: bool
    adversarial_epsilons: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(min_length=1)
    student_budget: StudentBudget


class MlflowParams(Section):
    experiment: str = Field(min_length=1)


class PromoteParams(Section):
    """When the retrain flow moves the ``champion`` alias to the new int8 student."""

    max_f1_drop: float = Field(ge=0.0, le=1.0)  # below the champion's test f1_macro, at most
    max_int8_drop: float = Field(ge=0.0, le=1.0)  # int8 below its own fp32 student, at most
    max_latency_ratio: float = Field(gt=0.0)  # int8 b64 latency / fastest fp32 student runtime


class RetrainParams(Section):
    """The scheduled retrain deployment (``visionpipe serve`` / ``visionpipe deploy``)."""

    cron: str = Field(min_length=9)  # five fields, e.g. "0 3 * * *"
    timezone: str = Field(min_length=1)
    pull: bool  # `dvc pull` first, when a DVC remote is configured
    push: bool  # `dvc push` after, when a DVC remote is configured

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"a cron expression has 5 fields (got {value!r})")
        return value


class Params(Section):
    seed: int = Field(ge=0)
    data: DataParams
    audit: AuditParams
    resample: ResampleParams
    augment: AugmentParams
    train: TrainParams
    distill: DistillParams
    quantize: QuantizeParams
    evaluate: EvaluateParams
    mlflow: MlflowParams
    promote: PromoteParams
    retrain: RetrainParams

    @model_validator(mode="after")
    def _device_augmentation(self) -> Params:
        """The device data path has no crop/elastic/blur/hue: say so before any stage runs."""
        for section in ("train", "distill"):
            if getattr(self, section).data_on_device:
                used = [key for key in DEVICE_UNSUPPORTED if getattr(self.augment, key) > 0]
                if used:
                    raise ValueError(
                        f"{section}.data_on_device: true augments on the device, which has no "
                        f"{', '.join(f'augment.{key}' for key in used)}: set them to 0 or "
                        f"{section}.data_on_device to false"
                    )
        return self


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: missing (every key must be set in params.yaml)"
    if isinstance(error["input"], dict):  # a check across keys: its message names them
        return f"{key}: {message}"
    return f"{key}: {message} (got {error['input']!r})"


def parse_params(raw: Any, origin: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ParamsError naming every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        details = "\n  ".join(_describe(error) for error in exc.errors())
        raise ParamsError(f"{origin} is invalid:\n  {details}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (the only place the pipeline reads it)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, origin=str(path))
