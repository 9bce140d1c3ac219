"""One frozen configuration tree and one override path (dotted keys).

    RunConfig
      .model      ModelConfig      architecture options of METHOD s2
      .data       DataConfig       where the data comes from
      .optim      OptimConfig      Adam + batch size (METHOD s5)
      .schedule   ScheduleConfig   variant, stage switch C, epochs, early stopping, swap weights
      .eval       EvalConfig       what the end-of-run evaluation scores (METHOD s6)
      .tracking   TrackingConfig   MLflow
      .checkpoint CheckpointConfig where and how often to checkpoint

`apply_overrides(cfg, ["optim.lr=3e-4", "model.z_dim=16"])` is the one override path, used by the
CLI, by Tune's param space (`to_flat` / `from_flat`) and for MLflow params. Every value is checked
in `__post_init__`; a bad one raises ValueError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

VARIANTS = ("dsae", "dsae_freeze", "ts_dsae_wo_reg", "ts_dsae")
Z_FEATURES = ("^", ">", "<", "><")
V_POSTERIORS = ("^", "><")
Z_POSTERIORS = ("x", ">", ">>")
Z_PRIORS = ("x", ">", ">>")
LIKELIHOODS = ("^", "><")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value!r} must be a finite number")
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _sizes(key: str, value) -> None:
    if len(value) == 0 or any(int(v) <= 0 for v in value):
        raise ValueError(f"{key}={value!r} must be a non-empty list of positive layer sizes")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture (METHOD s2). Defaults are the paper's; option strings are the reference's."""

    input_dim: int = 80
    v_dim: int = 16
    z_dim: int = 32
    encoder_hidden: tuple[int, ...] = (64, 64)
    transition_hidden: tuple[int, ...] = (32, 32)
    decoder_hidden: tuple[int, ...] = (64, 64)
    z_feature: str = "^"       # '^' MLP, '>' forward LSTM, '<' backward LSTM, '><' BiLSTM (averaged)
    v_posterior: str = "^"     # '^' MLP + masked mean pool, '><' BiLSTM + masked mean pool
    z_posterior: str = "x"     # 'x' q(z_t|feat_t), '>' MLP([feat_t; z_t-1]), '>>' LSTM([feat_t; z_t-1])
    z_prior: str = ">>"        # 'x' N(0, I), '>' MLP(z_t-1), '>>' LSTM(z_1:t-1)
    likelihood: str = "^"      # '^' frame-wise MLP, '><' BiLSTM
    v_condition: bool = False  # concatenate v to the z posterior's input

    def __post_init__(self) -> None:
        for key in ("input_dim", "v_dim", "z_dim"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("encoder_hidden", "transition_hidden", "decoder_hidden"):
            _sizes(f"model.{key}", getattr(self, key))
        _choice("model.z_feature", self.z_feature, Z_FEATURES)
        _choice("model.v_posterior", self.v_posterior, V_POSTERIORS)
        _choice("model.z_posterior", self.z_posterior, Z_POSTERIORS)
        _choice("model.z_prior", self.z_prior, Z_PRIORS)
        _choice("model.likelihood", self.likelihood, LIKELIHOODS)


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from: "toy" (tsdsae.toy, made in memory) or a dataset URI
    (a local folder or s3://bucket/prefix holding shards and dataset.json)."""

    uri: str = "toy"
    endpoint_url: str = ""       # S3-compatible endpoint; "" = AWS_ENDPOINT_URL or boto3 default
    toy_clips: int = 512         # toy dataset size (all splits together)
    toy_seconds: float = 1.0     # toy clip length
    toy_instruments: int = 2
    toy_seed: int = 0
    # Streaming the train split from its shards (tsdsae.data.stream) instead of holding it in
    # memory: "auto" when its features exceed memory_budget_mb, "on", or "off".
    stream: str = "auto"
    memory_budget_mb: float = 4096.0
    shuffle_buffer: int = 512    # clips in a streaming rank's shuffle buffer

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("data.uri must be 'toy' or a dataset URI (a folder or s3://bucket/prefix)")
        if self.stream not in ("auto", "on", "off"):
            raise ValueError(f"data.stream={self.stream!r} must be 'auto', 'on' or 'off'")
        _positive("data.memory_budget_mb", self.memory_budget_mb)
        _positive("data.shuffle_buffer", self.shuffle_buffer)
        _positive("data.toy_clips", self.toy_clips)
        _positive("data.toy_seconds", self.toy_seconds)
        if self.toy_instruments < 2:
            raise ValueError(f"data.toy_instruments={self.toy_instruments} must be >= 2")


@dataclass(frozen=True)
class OptimConfig:
    """Adam (METHOD s5): lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay, batch 128."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    batch_size: int = 128

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _positive("optim.batch_size", self.batch_size)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which model variant, when stage 2 starts (epoch C), the budget and early stopping."""

    variant: str = "ts_dsae"
    switch_epoch: int = 300     # C: stage 1 is epochs 0 .. C-1
    max_epochs: int = 4000
    patience: int = 300         # epochs without a better val loss before stopping
    swap_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        _choice("schedule.variant", self.variant, VARIANTS)
        _positive("schedule.max_epochs", self.max_epochs)
        _positive("schedule.patience", self.patience)
        _positive("schedule.switch_epoch", self.switch_epoch, allow_zero=True)
        if self.variant != "dsae" and self.switch_epoch >= self.max_epochs:
            raise ValueError(
                f"schedule.switch_epoch={self.switch_epoch} must be smaller than "
                f"schedule.max_epochs={self.max_epochs}, or stage 2 never starts")
        if len(self.swap_weights) != 4 or not all(0 <= w < math.inf for w in self.swap_weights):
            raise ValueError(f"schedule.swap_weights={self.swap_weights!r} must be 4 finite "
                             "weights >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation of the best checkpoint at the end of a run (tsdsae.evaluate, METHOD s6).

    The same with tracking on or off: what a run scores does not depend on where it is logged.
    Checkpoints are chosen on val; `split` is the held-out split that is scored and reported
    (METHOD s5: not the split that chose the checkpoint). Set `split=val` for a dataset that
    has no test split.
    """

    split: str = "test"         # split scored and reported
    pitch: bool = True          # the local metric (CREPE raw pitch accuracy)
    crepe_model: str = "full"   # 'full' as in the paper; 'tiny' is ~10x faster on CPU
    pitch_clips: int = 32       # evaluation clips scored by CREPE (0 = all)

    def __post_init__(self) -> None:
        _choice("eval.split", self.split, ("train", "val", "test"))
        _choice("eval.crepe_model", self.crepe_model, ("full", "tiny"))
        _positive("eval.pitch_clips", self.pitch_clips, allow_zero=True)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. uri "" = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "tsdsae"
    figures: bool = True        # swap grid, swap WAVs, v projection, z trajectories at the end

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("tracking.experiment must be a non-empty experiment name")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints: a local folder or s3:// prefix; one every `every` epochs and at each stage end."""

    root: str = "runs"
    every: int = 10

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("checkpoint.root must be a folder or s3:// URI")
        _positive("checkpoint.every", self.every)


@dataclass(frozen=True)
class RunConfig:
    name: str = "tsdsae"
    seed: int = 831
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if (not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\")
                or self.name.strip() != self.name):
            raise ValueError(f"name={self.name!r} must be one folder name (no '/', '\\', "
                             "'.' or '..', no surrounding spaces): the run's folder is "
                             "checkpoint.root/NAME")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: choose one of auto, cpu, cuda, cuda:N")


# ---------------------------------------------------------------------------------------------
# Presets


def paper(**top) -> RunConfig:
    """The paper's configuration (METHOD s2, s5): TS-DSAE, z_dim 32, C = 300, 4,000 epochs,
    patience 300, batch 128, Adam 1e-3."""
    return RunConfig(**top)


def debug(**top) -> RunConfig:
    """Tiny: the toy dataset, a few epochs, trains on CPU in seconds. What the tests run."""
    return RunConfig(
        name=top.pop("name", "debug"),
        model=ModelConfig(v_dim=8, z_dim=8, encoder_hidden=(32, 32), transition_hidden=(16,),
                          decoder_hidden=(32, 32)),
        data=DataConfig(uri="toy", toy_clips=256, toy_seconds=1.0),
        optim=OptimConfig(batch_size=32),
        schedule=ScheduleConfig(switch_epoch=5, max_epochs=12, patience=12),
        eval=EvalConfig(pitch=False),
        tracking=TrackingConfig(enabled=False, figures=False),
        **top)


def toy(**top) -> RunConfig:
    """The paper's model (at z_dim 8) on the toy dataset, with a short schedule: about 10 s of
    training on 2 CPU cores, enough for TS-DSAE to disentangle (and for DSAE to collapse).
    The CREPE pitch metric is off (eval.pitch=true adds it, minutes on a CPU)."""
    return RunConfig(
        name=top.pop("name", "toy"),
        model=ModelConfig(z_dim=8),
        data=DataConfig(uri="toy", toy_clips=512, toy_seconds=1.0),
        optim=OptimConfig(batch_size=32),
        schedule=ScheduleConfig(switch_epoch=20, max_epochs=60, patience=60),
        eval=EvalConfig(pitch=False),
        tracking=TrackingConfig(enabled=False),
        **top)


PRESETS = {"paper": paper, "debug": debug, "toy": toy}


# The budget of a run on the user's own data, in optimisation steps (not epochs: an epoch's
# steps depend on the dataset's size). Measured on varied renders (data_prep.varied, 4
# instruments, 800 training clips; README "Your own recordings"): with 1,400 + 2,100 steps
# TS-DSAE reached gswap/lswap >= 0.95 on one seed of two, with 1,400 + 4,200 on both (about 25
# min on 2 CPU cores, 1.5 min on an H200). Stage 1, then stage 2 (DSAE trains the sum in its
# one stage).
OWN_STAGE1_STEPS = 1400
OWN_STAGE2_STEPS = 4200


def step_budget(cfg: RunConfig, n_train: int, stage1_steps: int = OWN_STAGE1_STEPS,
                stage2_steps: int = OWN_STAGE2_STEPS) -> RunConfig:
    """`cfg` with its schedule set from a budget in steps for a training split of `n_train`
    clips: switch_epoch = ceil(stage1_steps / S), max_epochs = switch_epoch + ceil(stage2_steps
    / S) with S = ceil(n_train / batch_size) steps per epoch, and patience = max_epochs (the
    budget, not early stopping, ends the run; the best val checkpoint is still the one kept).
    Raises ValueError for an empty training split."""
    if n_train < 1:
        raise ValueError("the training split is empty")
    per_epoch = math.ceil(n_train / cfg.optim.batch_size)
    switch = math.ceil(stage1_steps / per_epoch)
    total = switch + math.ceil(stage2_steps / per_epoch)
    return apply_overrides(cfg, {"schedule.switch_epoch": switch, "schedule.max_epochs": total,
                                 "schedule.patience": total})


# ---------------------------------------------------------------------------------------------
# Dotted keys


def to_flat(cfg, redact: bool = True) -> dict[str, typing.Any]:
    """{"model.z_dim": 32, "optim.lr": 0.001, "seed": 831, ...}: MLflow params, checkpoints and
    Tune keys. With `redact` (the default; everything that is logged or stored) URL values lose
    their user:password@ and query string (tsdsae.storage.redact_url): a credential in an
    endpoint or tracking URL stays in the running process."""
    out: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in to_flat(value, redact).items()})
        elif redact and isinstance(value, str) and "://" in value:
            from tsdsae.storage import redact_url       # string work only (no boto3)
            out[f.name] = redact_url(value)
        else:
            out[f.name] = value
    return out


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, raw, typ):
    """Parse `raw` (a string from the CLI or a value from YAML/Tune) into `typ`, or raise."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "1", "yes"):
                return True
            if isinstance(raw, str) and raw.lower() in ("false", "0", "no"):
                return False
            raise TypeError
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise TypeError
            return int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise TypeError
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(f"{key}={raw!r} must be a finite number")
            return value
        if typ is str:
            if not isinstance(raw, str):
                raise TypeError
            return raw
        if origin is tuple:
            (elem, _) = typing.get_args(typ)
            if isinstance(raw, str):
                raw = [s for s in raw.strip("()[] ").split(",") if s.strip()]
            if not isinstance(raw, (list, tuple)):
                raise TypeError
            return tuple(_coerce(key, r, elem) for r in raw)
    except (TypeError, ValueError) as exc:
        if "finite" in str(exc):
            raise ValueError(str(exc)) from None
    else:
        raise ValueError(f"{key}: unsupported type {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise ValueError(f"{key}={raw!r} is not a valid {name}")


def _set_many(cfg, items: list[tuple[list[str], typing.Any, str]]):
    """Apply (path parts, raw value, full key) items to `cfg`, one replace per section, so that
    keys checked together (schedule.switch_epoch vs schedule.max_epochs) can change together."""
    hints = _field_types(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    direct: dict[str, typing.Any] = {}
    nested: dict[str, list] = {}
    for parts, raw, full_key in items:
        head = parts[0]
        if head not in names:
            raise ValueError(f"unknown config key {full_key!r}; keys here are {sorted(names)}")
        current = getattr(cfg, head)
        if len(parts) == 1:
            if dataclasses.is_dataclass(current):
                raise ValueError(f"{full_key!r} is a section; set one of its keys, "
                                 f"e.g. {full_key}.{dataclasses.fields(current)[0].name}")
            direct[head] = _coerce(full_key, raw, hints[head])
        elif not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown config key {full_key!r}: {head!r} is not a section")
        else:
            nested.setdefault(head, []).append((parts[1:], raw, full_key))
    for head, sub in nested.items():
        direct[head] = _set_many(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct) if direct else cfg


# Keys that moved to another section: stored configurations (checkpoints) that use the old name
# still load through from_flat; an override with the old name is refused, naming the new one.
MOVED_KEYS = {"data.eval_split": "eval.split", "tracking.pitch": "eval.pitch",
              "tracking.crepe_model": "eval.crepe_model", "tracking.pitch_clips": "eval.pitch_clips"}


def apply_overrides(cfg: RunConfig, overrides) -> RunConfig:
    """Apply "a.b=value" strings or a {"a.b": value} mapping; the result is re-validated."""
    items = list(overrides.items() if isinstance(overrides, dict) else [
        _split_override(o) for o in overrides])
    for key, _ in items:
        if key in MOVED_KEYS:
            raise ValueError(f"config key {key!r} is now {MOVED_KEYS[key]!r}; "
                             f"use {MOVED_KEYS[key]}=...")
    return _set_many(cfg, [(key.split("."), raw, key) for key, raw in items])


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. optim.lr=3e-4")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def from_flat(flat: dict[str, typing.Any], base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of dotted keys (to_flat's form, e.g. a checkpoint's "config") over `base`;
    keys of MOVED_KEYS are read under their new names."""
    return apply_overrides(base or RunConfig(),
                           {MOVED_KEYS.get(k, k): v for k, v in flat.items()})
