"""One typed configuration for a run: dataclasses, YAML presets and dotted command-line overrides.

    cfg = load_config("configs/toy_25gaussians.yaml", ["train.steps=2000", "data.batch_size=512"])

An unknown key or a value of the wrong type fails here, before anything runs, naming the key and
what is valid. The resolved configuration is saved as ``config.yaml`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig
from models.factory import ModelConfig
from models.mala import MALAConfig
from trainer.checkpoint import CheckpointConfig
from trainer.evaluation import EvalConfig
from trainer.guard import GuardConfig
from trainer.metrics import LogConfig
from trainer.runtime.deepspeed_engine import DeepSpeedConfig

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A malformed preset or override; the message names the key and what is valid."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false. PyYAML's 1.1 also reads no/off/yes/on as
    booleans, which turned ``train.mixed_precision=no`` and ``train.capture=off`` into False."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text) -> Any:
    """A preset, a saved config.yaml or an override value (a string or an open file)."""
    return yaml.load(text, Loader=_ConfigLoader)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 5000  # generator steps
    energy_steps: int = 1  # energy steps per generator step
    penalty_weight: float = 0.1  # lambda of the zero-centred gradient penalty
    # Lazy penalty (StyleGAN2's lazy regularisation): the penalty on every k-th energy step only, with
    # weight k * lambda. 1 is exact MEG; larger k saves the double backward on the other steps.
    penalty_every: int = 1
    entropy_weight: float = 1.0  # weight of the MI (entropy) term in the generator loss
    energy_optim: OptimConfig = field(default_factory=OptimConfig)
    generator_optim: OptimConfig = field(default_factory=OptimConfig)  # G and T together
    lr_final_factor: float = 1.0  # every lr decays linearly to lr * factor by the last step ...
    lr_decay_fraction: float = 1.0  # ... over this last fraction of the steps (constant before)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16: dynamic loss scaling, overflowing steps skipped
    engine: Literal["ddp", "deepspeed"] = "ddp"  # deepspeed: one engine per update; see the deepspeed section
    # auto: each step is captured as a CUDA graph after a 3-step warm-up and replayed (one process on a
    # CUDA device with the ddp engine; otherwise the run says why not and runs eagerly); off: always eager.
    capture: Literal["auto", "off"] = "auto"
    negatives: Literal["generator", "mala"] = "generator"  # generator: E's negatives are G(z); mala: after latent MALA
    negatives_mala: MALAConfig = field(default_factory=lambda: MALAConfig(steps=5))
    seed: int = 0
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Seconds a collective (a gradient reduction, a barrier, the rendezvous) may wait for the other
    # ranks: a rank that stops answering (hung, stopped, its node gone) ends the job within this.
    collective_timeout: float = field(default=600.0, metadata={"range": "(0, inf)"})

    def __post_init__(self) -> None:
        for key in ("steps", "energy_steps", "penalty_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not self.collective_timeout > 0:  # NaN too
            raise ValueError(f"train.collective_timeout must be > 0 seconds, got {self.collective_timeout}")


@dataclass
class RunConfig:
    name: str = "meg"
    output_dir: str = ""  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = os.path.join("runs", self.name)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against a field's annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, key)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {annotation}, got {value!r}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(full, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def resolve_preset(name_or_path: str) -> str:
    """A preset's path: an existing file, or a name in configs/ (with or without .yaml)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    for candidate in (os.path.join(PRESET_DIR, name_or_path), os.path.join(PRESET_DIR, name_or_path + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    available = (
        sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml")) if os.path.isdir(PRESET_DIR) else []
    )
    raise ConfigError(f"no config file or preset {name_or_path!r}; presets: {', '.join(available)}")


def _read_preset(name_or_path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's tree, with its ``base:`` presets (a name or a path) merged underneath it."""
    path = resolve_preset(name_or_path)
    if path in chain:
        raise ConfigError(f"presets inherit in a circle: {' -> '.join([*chain, path])}")
    try:
        with open(path) as f:
            tree = parse_yaml(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one preset (a name in configs/ or a path), got {base!r}")
    return _merge(_read_preset(base, (*chain, path)), tree)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (a list or a value replaces the base's)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree: dict[str, Any] = _read_preset(preset) if preset else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=1000)")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return _build(RunConfig, tree)


TRUST_INCEPTION_ENV = "MEG_TRUST_INCEPTION"


def _strings(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _strings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            yield f"{prefix}{key}", value


def check_launcher_precision(cfg: RunConfig, environ: dict[str, str] | None = None) -> None:
    """``accelerate launch --mixed_precision X`` (or an accelerate config file's mixed_precision)
    reaches the trainer as ACCELERATE_MIXED_PRECISION, but the trainer's precision is
    train.mixed_precision: a launcher setting that differs is refused rather than ignored."""
    launched = (environ if environ is not None else os.environ).get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", cfg.train.mixed_precision):
        raise ConfigError(
            f"accelerate launch asks for mixed precision {launched!r} (--mixed_precision or its config file), but "
            f"this trainer takes its precision from train.mixed_precision (now {cfg.train.mixed_precision!r}): "
            f"pass train.mixed_precision={launched} to trainer/main.py and leave accelerate's at no."
        )


def check_commands(cfg: RunConfig, allow_pipe: bool = False, trust_inception: bool = False) -> None:
    """Nothing a configuration says runs a program or loads code unless the command line allowed it:
    a URL whose scheme runs a program (pipe:, ...) needs --allow-pipe, a TorchScript eval.fid.inception
    --trust-inception. Sets the process-wide permissions the openers check (and child processes inherit)."""
    from data_pipeline.shards import is_command_url  # the loader itself reads no data code
    from data_pipeline.stream import ALLOW_COMMANDS_ENV

    if not allow_pipe:
        for key, value in _strings(dataclasses.asdict(cfg)):
            if is_command_url(value):
                raise ConfigError(
                    f"{key}={value!r} runs a program when it is opened: refused. Pass --allow-pipe on the command "
                    "line to allow it."
                )
    if cfg.eval.fid.inception and not trust_inception:
        raise ConfigError(
            f"eval.fid.inception={cfg.eval.fid.inception!r} is TorchScript, which runs code when it is loaded: "
            "refused. Pass --trust-inception on the command line to load it, or leave it empty for the packaged "
            "Inception."
        )
    for env, allowed in ((ALLOW_COMMANDS_ENV, allow_pipe), (TRUST_INCEPTION_ENV, trust_inception)):
        if allowed:
            os.environ[env] = "1"
        else:
            os.environ.pop(env, None)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
