"""The experiment config tree: frozen dataclasses, YAML loading, dotted overrides, validation.

One name per hyperparameter everywhere: the dotted key here (``method.tau_pmc``) is the CLI
override, the search-space key and the MLflow param.

The ``method`` section is typed by ``method.name``: each method has its own dataclass below (they
share the self-training base fields), so an override of a key the chosen method does not have is an
error that lists the keys it does have.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from lpcgma.config_values import ConfigError, check_value, coerce_value


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "loveda", "isprs", "shards"] = "synthetic"  # which dataset family
    root: str = ""  # dataset root folder (or s3:// URI for shards); unused for synthetic
    source_domain: str = "rural"  # synthetic/loveda: rural|urban (loveda also *_irrg); isprs: potsdam|vaihingen
    target_domain: str = "urban"  # the unlabelled domain we adapt to
    target_train_split: Literal["train", "val"] = "val"  # LoveDA: val = official benchmark, train = DAFormer
    target_eval_split: Literal["train", "val", "test"] = "val"  # split the target metrics are computed on
    source_eval_split: Literal["train", "val"] = "val"  # source validation split (label-free model selection)
    target_labels: bool = True  # False: target masks are never read, no target mIoU (select with train.select_by)
    eval_max_tiles: int = 0  # evaluate on at most this many target tiles (0 = all)
    crop_size: int = 512  # training crop (pixels, square)
    batch_size: int = 2  # per domain and per worker: batch_size source + batch_size target
    num_workers: int = 2  # DataLoader worker processes
    cache_tiles: bool = False  # keep decoded tiles in memory (each loader process its own copy): small datasets only
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale range before cropping
    eval_scale: float = 1.0  # test scale: tiles are resized by it before inference, predictions back to full size
    hflip: bool = True  # random horizontal/vertical flips and rot90
    photometric: bool = True  # random brightness/contrast/saturation jitter
    # texture-robust source training: source (labelled) crops only, every stage; fine texture is the cue
    # that transfers worst (RESULTS.md, session 16), blur removes it and pixel noise puts it on every class
    source_blur_prob: float = 0.0  # probability that a source crop is Gaussian-blurred (σ uniform in [0.5, 1.5] px)
    source_noise_prob: float = 0.0  # probability that a source crop gets Gaussian pixel noise
    source_noise_std: float = 20.0  # that noise's std, in 0–255 pixel units
    rcs_enabled: bool = False  # image-level rare-class sampling of source tiles (DAFormer RCS)
    rcs_temperature: float = 0.01  # T_rcs: P(c) ∝ exp((1 - f_c) / T_rcs); smaller = rarer classes favoured
    # synthetic benchmark only
    synthetic_tiles: int = 64  # tiles per domain and split
    synthetic_tile_size: int = 256  # tile side in pixels
    synthetic_seed: int = 0  # the benchmark's seed (independent of the training seed)
    synthetic_target_sensor: Literal["rgb", "irrg"] = "irrg"  # target radiometry: RGB or IRRG false colour
    synthetic_shift: float = 1.0  # target's shift strength from the source: 0 = the source's look and layouts, 1 = full
    # the target's materials: "own" (urban roofs, asphalt, …; some classes then look like other source
    # classes) or "source" (the source's; the shift is radiometry, textures, shadows and layouts)
    synthetic_target_palette: Literal["own", "source"] = "own"
    # the target's layouts: "shifted" (a tile has the urban layout with probability synthetic_shift, else
    # a rural one) or "source" (rural layouts at any strength: the shift is the look alone)
    synthetic_target_layouts: Literal["shifted", "source"] = "shifted"
    # the target's textures: "own" (two urban classes in textures a source model reads as barren's) or
    # "distinct" (those two rendered so that no target class takes another source class's texture)
    synthetic_target_textures: Literal["own", "distinct"] = "own"
    # ISPRS only
    isprs_modality: Literal["rgb", "irrg"] = "irrg"  # Potsdam input bands
    isprs_ignore_clutter: bool = False  # True: clutter → ignore (5-class protocol)


# -------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["resnet18", "resnet50", "resnet101"] = "resnet101"  # DeepLabv2 encoder
    pretrained: bool = True  # ImageNet weights from torchvision (must be in the torch cache offline)
    proj_dim: int = 64  # D: projection-head embedding size (L2-normalised)
    aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)  # DeepLabv2 ASPP branch dilations
    ema_momentum: float = 0.999  # EMA teacher momentum
    bn_momentum: float = 0.1  # BatchNorm running-statistics momentum (lower: steadier eval statistics, small batches)
    init_checkpoint: str = ""  # start the student (and teacher) from this checkpoint folder, e.g. a source-only run


# ---------------------------------------------------------------------------------------- optimiser
@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # SGD (DeepLabv2 era) or AdamW (DAFormer era)
    lr: float = 2.5e-4  # base learning rate (backbone)
    head_lr_mult: float = 10.0  # decoder/projection-head LR multiplier
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # weight decay
    warmup_iters: int = 0  # linear warm-up iterations
    poly_power: float = 0.9  # poly decay power
    grad_clip: float = 0.0  # max grad norm (0 = off)


# ------------------------------------------------------------------------------------------ trainer
@dataclass(frozen=True)
class TrainConfig:
    iters: int = 40000  # training iterations
    eval_every: int = 2000  # evaluate on the target split every N iterations (and at the end)
    checkpoint_every: int = 2000  # write a checkpoint every N iterations (and at the end)
    log_every: int = 50  # write training logs every N iterations
    seed: int = 0  # seeds torch, python and the data stream
    device: str = "auto"  # auto|cpu|cuda
    amp: bool = True  # mixed precision (GPU only; ignored on CPU)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # autocast dtype (bfloat16 → float16 where unsupported;
    # float16 adds a gradient scaler)
    channels_last: bool = False  # NHWC memory format for the networks and image batches
    compile: bool = False  # torch.compile the student's forward (the first steps pay the compilation)
    eval_window: int = 512  # sliding-window size for whole-tile inference
    eval_stride: int = 384  # sliding-window stride
    out_dir: str = "runs/default"  # run folder: checkpoints, metrics.jsonl, config.yaml
    resume: bool = True  # resume from out_dir/checkpoints/last.pt when present
    progress: bool = True  # progress bar on a terminal
    # model selection (lpcgma/engine/label_free.py); the label-free criteria cost about one forward
    # pass of 3 × label_free_tiles crops per evaluation, source_miou one sliding-window pass per tile
    select_by: str = "target_miou"  # picks checkpoints/best: a criterion (snd, entropy, im, ...) or its metric key
    label_free_tiles: int = 8  # fixed seeded target_train tiles (an eval_window crop each) for the criteria (0 = off)
    snd_pixels: int = 1024  # pixels of those crops (fixed seeded subsample) in the SND similarity matrix
    source_eval_tiles: int = 16  # fixed seeded data.source_eval_split tiles for source_miou (0 = off)
    # precise BN: before each evaluation, BatchNorm running statistics are recomputed as the average
    # over this many fixed training-augmented batches of each domain the student trains on (0 = off:
    # the running averages of the last training batches; noisy with small batches)
    precise_bn_batches: int = 0
    # weight averaging: evaluate, checkpoint as best and promote an exponential moving average of the
    # student's weights with this momentum (0 = the student itself); steadier than the last step's weights
    eval_ema: float = 0.0

    # the schedule: one place for when a run evaluates and checkpoints (the last step always does both)
    def is_eval_step(self, step: int) -> bool:
        """Whether the run evaluates after `step` (every `eval_every` steps, and at the last)."""
        return step % self.eval_every == 0 or step == self.iters

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether the run writes a step checkpoint after `step` (every `checkpoint_every`, and at the last)."""
        return step % self.checkpoint_every == 0 or step == self.iters

    def evaluations(self) -> int:
        """How many evaluations a whole run makes (the steps where `is_eval_step` holds)."""
        return self.iters // self.eval_every + (1 if self.iters % self.eval_every else 0)


# ------------------------------------------------------------------------------------ source stage
@dataclass(frozen=True)
class SourceStageConfig:
    """The shared source stage (two-stage protocol): a source-only model trained once per source
    setting, content-addressed and cached, that a run or every trial of a search starts from
    (`lpcgma/engine/source_stage.py`)."""

    enabled: bool = False  # start from the cached source-only model (trained first when missing)
    iters: int = 2000  # source-only training iterations
    projection_contrast: float = 0.0  # weight of a supervised pixel contrast that trains the projection head
    # on detached source features (the segmenter is unchanged; the embedding LPCGMA starts from); 0 = off
    store: str = ""  # folder or s3:// URI of the cache ("" = runs/source_models; a search: <storage>/source_models)
    optim: OptimConfig = field(default_factory=OptimConfig)  # its optimiser (the top-level optim is the adaptation's)


# ----------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodConfig:
    name: str = "source_only"  # the method: source_only|oracle|self_training|lpcgma|sdca|bida

    def validate(self, train_iters: int) -> None:
        """Check the method's values by the naming rules (temperatures > 0, thresholds and momenta in
        [0, 1], weights λ ≥ 0); a method's own rules extend this. Raise ConfigError naming the key."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("tau") or f.name.endswith("_tau"):
                check_value(value > 0, f"method.{f.name}", value, "> 0 (a temperature)")
            if "threshold" in f.name or f.name.endswith("momentum"):
                check_value(0 <= value <= 1, f"method.{f.name}", value, "in [0, 1]")
            if f.name.startswith("lambda_"):
                check_value(value >= 0, f"method.{f.name}", value, ">= 0")


@dataclass(frozen=True)
class SourceOnlyConfig(MethodConfig):
    name: str = "source_only"
    lambda_proj: float = 0.0  # supervised pixel contrast training the projection head on detached features (0 = off)
    tau_proj: float = 0.1  # its temperature


@dataclass(frozen=True)
class OracleConfig(MethodConfig):
    name: str = "oracle"  # trained on target labels: the upper reference


@dataclass(frozen=True)
class SelfTrainingConfig(MethodConfig):
    name: str = "self_training"
    lambda_st: float = 1.0  # λ_st: weight of the target pseudo-label CE
    pseudo_threshold: float = 0.968  # δ: confidence threshold of the pseudo-label quality weight
    pseudo_weighting: Literal["fraction", "confidence", "threshold"] = "fraction"  # DACS fraction, per-pixel q_t,
    # or threshold (1 where q_t ≥ δ, else 0: FixMatch / CBST)
    classmix: bool = True  # ClassMix source classes into target images (DACS)
    strong_augment: bool = False  # colour jitter + blur of the student's (mixed) target view, not the teacher's (DACS)
    # the class prior of the pseudo-labels: "source" (the teacher's probabilities as they are) or "em"
    # (moved to the target's class frequencies, estimated online by EM: docs/METHODS.md, label shift)
    pseudo_prior: Literal["source", "em"] = "source"
    prior_momentum: float = 0.99  # running-average momentum of the source and target class priors
    # per-class thresholds δ_c = running median (momentum below) of q over the pixels labelled c, capped
    # at δ (CBST-style; docs/METHODS.md): a class the teacher is never confident about still gets labels
    class_thresholds: bool = False
    class_threshold_momentum: float = 0.9
    teacher_scales: tuple[float, ...] = (1.0,)  # teacher probs averaged over the crop resized by each factor

    def validate(self, train_iters: int) -> None:
        super().validate(train_iters)
        scales = self.teacher_scales
        ok = bool(scales) and all(0 < t <= 4 for t in scales)
        check_value(ok, "method.teacher_scales", scales, "one or more factors in (0, 4]")


@dataclass(frozen=True)
class LPCGMAConfig(SelfTrainingConfig):
    name: str = "lpcgma"
    # probability-masked contrast (PMC)
    use_pmc: bool = True  # switch the PMC term
    lambda_pmc: float = 0.1  # λ_pmc
    tau_pmc: float = 0.1  # contrast temperature τ_pmc
    minority_boost: float = 0.5  # α: keep prob p_c = min(1, r·(ν_ref/ν_c)^α); 0 = uniform
    base_rate: float = 0.05  # r: base anchor sampling rate
    max_anchors: int = 4096  # cap on anchors per step (both domains together)
    static_anchors: bool = False  # max_anchors fixed slots with a validity mask (same sampling law, another
    # random stream): no host sync and static shapes for CUDA graphs / torch.compile; false: as many as kept
    freq_momentum: float = 0.99  # EMA momentum of the running class frequencies ν_c
    pmc_target_threshold: float = 0.968  # target pixels join PMC when q_t ≥ this
    # pixel contrast between photometric views (PIX)
    use_pix: bool = True  # switch the PIX term
    lambda_pix: float = 0.1  # λ_pix
    tau_pix: float = 0.1  # τ_pix
    pix_pixels: int = 1024  # pixels sampled per view pair
    pix_irrg_prob: float = 0.5  # probability that the strong view re-weights channels like RGB↔IRRG
    pix_strong_grad: bool = True  # backprop through the strong view (false: stop-gradient target, 1 backward less)
    # Gaussian multiprototypes (global)
    use_gmm_forward: bool = True  # switch forward alignment (target → source components)
    use_gmm_reverse: bool = True  # switch reverse alignment (components ← target)
    lambda_fwd: float = 0.1  # λ_fwd
    gaussians_per_class: int = 4  # K
    tau_gmm: float = 1.0  # τ_gmm: temperature on GMM class scores
    fwd_threshold: float = 0.9  # δ_fwd: target confidence gate of forward alignment
    fwd_confidence_weighting: bool = True  # weight forward CE by q_t
    rev_threshold: float = 0.95  # δ_rev: target confidence gate of reverse alignment
    rev_momentum: float = 0.999  # m_rev: momentum of the reverse update
    gmm_warmup_iters: int = 1000  # GMM terms start after this many iterations
    gmm_refit_every: int = 500  # EM refit interval
    gmm_em_iters: int = 10  # EM iterations per refit
    gmm_memory_per_class: int = 4096  # source embeddings remembered per class
    gmm_push_per_class: int = 256  # at most this many new source embeddings per class per step (random subsample)
    gmm_var_floor: float = 1e-4  # ε: diagonal variance floor
    gmm_memory_features: Literal["teacher", "student"] = "teacher"  # source embeddings remembered: the
    # teacher's (as specified; one extra teacher forward per step) or the student's, detached (no extra pass)

    def validate(self, train_iters: int) -> None:
        super().validate(train_iters)
        check_value(self.gaussians_per_class >= 1, "method.gaussians_per_class", self.gaussians_per_class, ">= 1")
        check_value(0 < self.base_rate <= 1, "method.base_rate", self.base_rate, "in (0, 1]")
        check_value(self.minority_boost >= 0, "method.minority_boost", self.minority_boost, ">= 0")
        check_value(self.max_anchors >= 2, "method.max_anchors", self.max_anchors, ">= 2")
        check_value(self.gmm_refit_every >= 1, "method.gmm_refit_every", self.gmm_refit_every, ">= 1")
        check_value(self.gmm_var_floor > 0, "method.gmm_var_floor", self.gmm_var_floor, "> 0")
        for key in ("gmm_memory_per_class", "gmm_push_per_class", "gmm_em_iters"):
            check_value(getattr(self, key) >= 1, f"method.{key}", getattr(self, key), ">= 1")


@dataclass(frozen=True)
class SDCAConfig(MethodConfig):
    name: str = "sdca"
    sdca_tau: float = 100.0  # τ of the distribution-aware contrastive bound (released code default)
    sdca_target_threshold: float = 0.9  # target pixels join when the model's confidence ≥ this
    sdca_normalize_stats: bool = True  # L2-normalise μ_k and σ²_k rows first (released code)
    lambda_feat: float = 1.0  # weight of the feature-level term (source + target)
    lambda_logit: float = 1.0  # weight of the logit-level term (source + target)
    sdca_init_batches: int = 0  # source batches of the initial statistics pass (0 = one epoch of tiles)
    # optional final self-training round on offline pseudo-labels (the paper's last stage): at step
    # train.iters - final_st_iters the model labels every target_train tile once (whole tiles, sliding
    # window), class c keeping pixels with confidence ≥ min(median confidence of c, cap); the remaining
    # steps train on source CE + CE on those fixed labels (no SDCA terms)
    final_st_iters: int = 0  # steps of the round at the end of train.iters (0 = off)
    final_st_threshold_cap: float = 0.9  # cap of the per-class median-confidence threshold (released code)
    final_st_source_weight: float = 1.0  # source CE weight in the round (0 = target only, as the released code)

    def validate(self, train_iters: int) -> None:
        super().validate(train_iters)
        expected = f"in [0, train.iters) = [0, {train_iters}) (0 = no final self-training round)"
        check_value(0 <= self.final_st_iters < train_iters, "method.final_st_iters", self.final_st_iters, expected)
        weight = self.final_st_source_weight
        check_value(weight >= 0, "method.final_st_source_weight", weight, ">= 0")


@dataclass(frozen=True)
class BiDAConfig(MethodConfig):
    name: str = "bida"
    lambda_st: float = 0.3  # CE on hybrid target labels (code default)
    lambda_entropy: float = 0.4  # entropy term
    lambda_contrast: float = 0.2  # weight of FCL + BCL
    bida_scale: float = 10.0  # cosine-logit scale
    bida_dynamic_threshold: float = 0.8  # dynamic-label confidence threshold
    bida_bias_momentum: float = 0.99  # EMA momentum of the class-wise domain bias b_k
    bida_calibration: bool = False  # calibrate source prototypes by α_t·b_k (α_t: 0 → 1 over training; the paper)
    # Where the paper's description and the released code differ, the defaults follow the released code
    # (measured better on 3 of 3 seeds, RESULTS.md issue 24; docs/METHODS.md lists each difference); the
    # paper's description: hybrid agree, detach true, absent zero, calibration true, entropy target
    bida_hybrid_rule: Literal["agree", "confident", "static"] = "static"  # target labels: the classifier's
    # alone (static: the released code), or classifier ∩ dynamic transfer (agree), or the more confident
    bida_detach_prototypes: bool = False  # false: gradients flow through the prototypes into the features they
    # average (FCL into source, BCL into target: the released code); true: fixed per-step anchors
    bida_absent_prototypes: Literal["zero", "drop", "negative"] = "negative"  # a class with no prototype in the
    # pair: cosine −1 (the released code), 0, or dropped from the softmax
    bida_entropy: Literal["target", "released"] = "released"  # the released code's H_s + 0.3·H_t with
    # log_softmax applied to the softmax, or the normalised target entropy


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    "source_only": SourceOnlyConfig,
    "oracle": OracleConfig,
    "self_training": SelfTrainingConfig,
    "lpcgma": LPCGMAConfig,
    "sdca": SDCAConfig,
    "bida": BiDAConfig,
}


# ----------------------------------------------------------------------------------------- tracking
@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else the project's mlflow/ sqlite store
    experiment: str = "lpcgma"  # MLflow experiment name
    run_name: str = ""  # "" = generated from method and dataset
    log_overlays: int = 4  # prediction overlays of this many fixed target tiles at each eval


# ------------------------------------------------------------------------------------------- root
@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_stage: SourceStageConfig = field(default_factory=SourceStageConfig)
    method: MethodConfig = field(default_factory=SourceOnlyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> ExperimentConfig:
        """Check cross-field value constraints; raise ConfigError naming the key."""
        check_value(self.data.crop_size > 0, "data.crop_size", self.data.crop_size, "> 0")
        check_value(self.data.batch_size > 0, "data.batch_size", self.data.batch_size, "> 0")
        check_value(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, ">= 0")
        lo, hi = self.data.scale_range
        check_value(0 < lo <= hi, "data.scale_range", self.data.scale_range, "0 < low <= high")
        check_value(0 < self.data.eval_scale <= 4, "data.eval_scale", self.data.eval_scale, "a factor in (0, 4]")
        check_value(0 <= self.data.synthetic_shift <= 1, "data.synthetic_shift", self.data.synthetic_shift, "in [0, 1]")
        for key in ("source_blur_prob", "source_noise_prob"):
            prob = getattr(self.data, key)
            check_value(0 <= prob <= 1, f"data.{key}", prob, "a probability in [0, 1]")
        check_value(self.data.source_noise_std > 0, "data.source_noise_std", self.data.source_noise_std, "> 0")
        check_value(self.data.rcs_temperature > 0, "data.rcs_temperature", self.data.rcs_temperature, "> 0")
        check_value(self.model.proj_dim > 0, "model.proj_dim", self.model.proj_dim, "> 0")
        check_value(0 <= self.model.ema_momentum < 1, "model.ema_momentum", self.model.ema_momentum, "in [0, 1)")
        check_value(0 < self.model.bn_momentum <= 1, "model.bn_momentum", self.model.bn_momentum, "in (0, 1]")
        check_value(self.optim.lr > 0, "optim.lr", self.optim.lr, "> 0")
        check_value(self.train.iters > 0, "train.iters", self.train.iters, "> 0")
        check_value(self.train.eval_every > 0, "train.eval_every", self.train.eval_every, "> 0")
        check_value(self.train.checkpoint_every > 0, "train.checkpoint_every", self.train.checkpoint_every, "> 0")
        check_value(self.train.eval_stride > 0, "train.eval_stride", self.train.eval_stride, "> 0")
        check_value(self.train.label_free_tiles >= 0, "train.label_free_tiles", self.train.label_free_tiles, ">= 0")
        check_value(0 <= self.train.eval_ema < 1, "train.eval_ema", self.train.eval_ema, "in [0, 1)")
        check_value(self.train.snd_pixels >= 2, "train.snd_pixels", self.train.snd_pixels, ">= 2")
        check_value(self.train.source_eval_tiles >= 0, "train.source_eval_tiles", self.train.source_eval_tiles, ">= 0")
        ss = self.source_stage
        check_value(ss.iters > 0, "source_stage.iters", ss.iters, "> 0")
        check_value(ss.optim.lr > 0, "source_stage.optim.lr", ss.optim.lr, "> 0")
        check_value(ss.projection_contrast >= 0, "source_stage.projection_contrast", ss.projection_contrast, ">= 0")
        check_value(
            not (ss.enabled and self.model.init_checkpoint),
            "model.init_checkpoint",
            self.model.init_checkpoint,
            "empty when source_stage.enabled=true (both give the starting weights: set one)",
        )
        check_value(
            self.train.precise_bn_batches >= 0, "train.precise_bn_batches", self.train.precise_bn_batches, ">= 0"
        )
        check_value(
            self.data.target_labels or self.method.name != "oracle",
            "method.name",
            self.method.name,
            "a method that reads no target labels when data.target_labels=false (the oracle trains on them)",
        )
        check_value(
            self.train.eval_stride <= self.train.eval_window,
            "train.eval_stride",
            self.train.eval_stride,
            f"<= train.eval_window ({self.train.eval_window})",
        )
        self.method.validate(self.train.iters)
        return self


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, coercing and rejecting unknown keys."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: "
            + ", ".join(prefix + k for k in sorted(known))
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp = hints[name]
        key = prefix + name
        if name == "method" and cls is ExperimentConfig:
            kwargs[name] = _build_method(value, key + ".")
        elif is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = coerce_value(value, tp, key)
    return cls(**kwargs)


def _build_method(values: Any, prefix: str) -> MethodConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section 'method' must be a mapping, got {values!r}")
    name = values.get("name", "source_only")
    if not isinstance(name, str) or name not in METHOD_CONFIGS:
        raise ConfigError(f"config key 'method.name' = {name!r} is invalid: expected one of {sorted(METHOD_CONFIGS)}")
    return _build(METHOD_CONFIGS[name], values, prefix)  # type: ignore[no-any-return]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted key → value for every resolved config key (``method.tau_pmc`` → 0.1)."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(to_dict(cfg), "")
    return flat


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value read as YAML: ``true``, ``0.1``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected key=value, e.g. method.tau_pmc=0.07")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def packaged_file(folder: str, name: str | Path) -> Path | None:
    """A file shipped inside the installed package: ``packaged_file("configs", "synthetic")`` →
    ``lpcgma/configs/synthetic.yaml`` (found from the installed package, never a script's folder)."""
    entry = resources.files("lpcgma") / folder / f"{str(name).removesuffix('.yaml')}.yaml"
    return Path(str(entry)) if entry.is_file() else None


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a packaged config (``synthetic`` → lpcgma/configs/synthetic.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = packaged_file("configs", name)
    if packaged is None:
        available = sorted(f.name.removesuffix(".yaml") for f in (resources.files("lpcgma") / "configs").iterdir())
        raise ConfigError(f"config '{name}' is neither a file nor a packaged config; packaged: {available}")
    return packaged


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> ExperimentConfig:
    """Load a YAML config (or the defaults), apply dotted overrides, validate.

    `overrides` is either ``["method.tau_pmc=0.07", ...]`` or ``{"method.tau_pmc": 0.07}``.
    A method override such as ``method.name=lpcgma`` re-types the method section.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
        if loaded is None:
            raise ConfigError(f"config file '{p}' is empty")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    file_tree = copy.deepcopy(tree)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        cfg = _build(ExperimentConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{e}{_blame(path, file_tree)}") from e
    return cfg.validate()


def _blame(path: str | Path | None, file_tree: dict[str, Any]) -> str:
    """Where a key or value that failed to build came from: the file, or (when the file alone
    builds) the command-line overrides."""
    if path is None:
        return ""
    try:
        _build(ExperimentConfig, file_tree, "")
    except ConfigError:
        return f" (in '{path}')"
    return " (from the command-line overrides)"


def replace(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with dotted overrides applied and validated."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return _build(ExperimentConfig, tree, "").validate()  # type: ignore[no-any-return]


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (saved with every run)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def valid_keys(method: str = "lpcgma") -> list[str]:
    """Every dotted key of the config tree for `method` (used to validate search spaces)."""
    cfg = ExperimentConfig(method=METHOD_CONFIGS[method]())
    return sorted(flatten(cfg))


__all__ = [
    "BiDAConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LPCGMAConfig",
    "METHOD_CONFIGS",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "OracleConfig",
    "SDCAConfig",
    "SelfTrainingConfig",
    "SourceOnlyConfig",
    "SourceStageConfig",
    "TrackingConfig",
    "TrainConfig",
    "dump_config",
    "flatten",
    "load_config",
    "packaged_file",
    "parse_override",
    "resolve_config_path",
    "replace",
    "to_dict",
    "valid_keys",
]
