"""One typed configuration for a run: dataclasses, YAML presets and dotted command-line overrides.

    cfg = load_config("configs/toy_25gaussians.yaml", ["train.steps=2000", "data.batch_size=512"])

An unknown key or a value of the wrong type fails here, before anything runs, naming the key and
what is valid. The resolved configuration is saved as ``config.yaml`` in the run folder.

The trainer's own sections are defined here; the models' in models/config.py, the data's in
data_pipeline/config.py, each evaluation's in its module in trainer/evaluation/. None of them
imports torch or numpy (tests/test_architecture.py checks), so that --print-config and the checks
before a run cost a tenth of a second, not the second and a half torch takes to import.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from data_pipeline.cli import ConfigError, UserError, shown
from data_pipeline.config import PATH_FIELD, DataConfig, expand_home
from models.config import EntropyConfig, MALAConfig, ModelConfig
from trainer.evaluation import EvalConfig
from trainer.evaluation.fid_kid import TRUST_INCEPTION_ENV

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# A configuration is small: a preset (or a checkpoint's config.yaml) larger or deeper than this is
# refused before it is parsed further, and anchors and aliases are refused altogether (a few hundred
# bytes of nested aliases expand to gigabytes: "billion laughs").
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class _ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false. PyYAML's 1.1 also reads no/off/yes/on as
    booleans, which turned ``train.mixed_precision=no`` and ``train.capture=off`` into False.
    No anchors or aliases, at most MAX_YAML_DEPTH levels of nesting, and no key twice in a mapping
    (PyYAML keeps the last, and a second ``train:`` silently dropped the first one's settings)."""

    _depth = 0

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor's own error says so
                if first is not key_node:
                    at, before = key_node.start_mark, first.start_mark
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r} at line {at.line + 1}, column {at.column + 1} "
                        f"(first at line {before.line + 1})"
                    )
        return super().construct_mapping(node, deep)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not accepted here: write the values out",
                event.start_mark,
            )  # fmt: skip
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str, source: str = "") -> Any:
    """A preset, a saved config.yaml or an override value; ``source`` names it in errors (ConfigError
    for a text over MAX_YAML_BYTES, malformed YAML, anchors or aliases, or too deep a nesting)."""
    where = source or "the YAML text"
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} has {len(text)} characters; a configuration holds at most {MAX_YAML_BYTES}")
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: the problem and where (YAML's own message quotes the text over several lines)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(p for p in (error.context, error.problem) if p)
        return " ".join(f"{what}{where}".split())[:200]
    return " ".join(str(error).split())[:200]


def read_yaml_file(path: str) -> Any:
    """A YAML file's contents, reading at most MAX_YAML_BYTES (+1, to tell a larger file)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_YAML_BYTES + 1)
    return parse_yaml(text, path)


@dataclass
class GuardConfig:
    """On a non-finite metric or one past its bound, roll back to the last checkpoint with every
    learning rate multiplied by ``lr_factor``, at most ``max_rollbacks`` times."""

    max_rollbacks: int = field(default=3, metadata={"range": "[0, 1000]"})  # 0: a diverging run stops at once
    lr_factor: float = field(default=0.5, metadata={"range": "(0, 1]"})
    # Bounds on |E(fake) - E(real)| and the penalty; 0 disables.
    max_abs_energy_gap: float = field(default=1e4, metadata={"range": "[0, inf)"})
    max_penalty: float = field(default=1e6, metadata={"range": "[0, inf)"})
    # Checked before every checkpoint, so that no checkpoint holds weights a rollback would flee:
    # every parameter finite and each network's parameter norm at most this (0: finiteness only).
    max_param_norm: float = field(default=1e5, metadata={"range": "[0, inf)"})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"range": "(0, inf)"})
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9], metadata={"range": "[0, 1)", "length": "[2, 2]"})
    weight_decay: float = field(default=0.0, metadata={"range": "[0, inf)"})


@dataclass
class TrainConfig:
    steps: int = field(default=5000, metadata={"range": "[1, 1e12]"})  # generator steps
    energy_steps: int = field(default=1, metadata={"range": "[1, 1000]"})  # energy steps per generator step
    penalty_weight: float = field(default=0.1, metadata={"range": "[0, inf)"})  # lambda of the zero-centred penalty
    # Lazy penalty (StyleGAN2's lazy regularisation): the penalty on every k-th energy step only, with
    # weight k * lambda. 1 is exact MEG; larger k saves the double backward on the other steps.
    penalty_every: int = field(default=1, metadata={"range": "[1, 1e6]"})
    # Weight of the MI (entropy) term in the generator loss; the generator targets p ∝ exp(-E / it).
    entropy_weight: float = field(default=1.0, metadata={"range": "(0, inf)"})
    # The generator's entropy term (models/entropy.py): MEG's Jensen-Shannon MI bound (jsd), Donsker-
    # Varadhan with MINE's moving average (dv), NWJ, InfoNCE, SMILE, or VERA's variational entropy
    # (learned output noise and posterior in T's place). Each one's settings: the entropy section.
    entropy_estimator: Literal["jsd", "dv", "nwj", "infonce", "smile", "vera"] = "jsd"
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    # Decay of an exponential moving average of G's weights, updated after every generator step (0: off).
    # Evaluation, the sample tool and the weights export's "generator_ema." tensors use the average.
    generator_ema: float = field(default=0.0, metadata={"range": "[0, 1)"})
    energy_optim: OptimConfig = field(default_factory=OptimConfig)
    generator_optim: OptimConfig = field(default_factory=OptimConfig)  # G and T together
    # Every lr decays linearly to lr * lr_final_factor by the last step, over the last
    # lr_decay_fraction of the steps (constant before).
    lr_final_factor: float = field(default=1.0, metadata={"range": "[0, inf)"})
    lr_decay_fraction: float = field(default=1.0, metadata={"range": "[0, 1]"})
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16: dynamic loss scaling, overflowing steps skipped
    # deepspeed: one engine per update (see the deepspeed section); fsdp: FSDP2, E, G and T sharded per
    # layer (trainer/runtime/fsdp.py; mixed_precision no or bf16)
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    # auto: each step is captured as a CUDA graph after a 3-step warm-up and replayed (one process on a
    # CUDA device with the ddp engine; otherwise the run says why not and runs eagerly); off: always eager.
    capture: Literal["auto", "off"] = "auto"
    negatives: Literal["generator", "mala"] = "generator"  # generator: E's negatives are G(z); mala: after latent MALA
    negatives_mala: MALAConfig = field(default_factory=lambda: MALAConfig(steps=5))
    seed: int = field(default=0, metadata={"range": "[0, 4294967295]"})
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Seconds a collective (a gradient reduction, a barrier, the rendezvous) may wait for the other
    # ranks: a rank that stops answering (hung, stopped, its node gone) ends the job within this.
    collective_timeout: float = field(default=600.0, metadata={"range": "(0, inf)"})
    # Seconds the other ranks wait for the main process's evaluation during training (it evaluates
    # alone): an evaluation may take far longer than a collective (FID of 50,000 samples, MALA).
    evaluation_timeout: float = field(default=14400.0, metadata={"range": "(0, inf)"})

    def __post_init__(self) -> None:
        for key in ("steps", "energy_steps", "penalty_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("collective_timeout", "evaluation_timeout"):
            if not getattr(self, key) > 0:  # NaN too
                raise ValueError(f"train.{key} must be > 0 seconds, got {getattr(self, key)}")
        if self.engine == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError(
                "train.engine=fsdp supports train.mixed_precision=no or bf16 (no fp16 loss scaler for sharded "
                "gradients); use bf16, or train.engine=ddp for fp16"
            )
        if self.engine == "fsdp" and self.entropy_estimator == "vera":
            # Measured on 2 ranks: after 6 steps 8.4e-3 from the DDP twin's weights (dv: 0.0); not yet understood.
            raise ValueError(
                "train.entropy_estimator=vera is not supported with train.engine=fsdp yet (its weights drift from "
                "the DDP run's); use ddp or deepspeed for vera"
            )
        if self.engine == "fsdp" and self.generator_ema > 0:
            raise ValueError(
                "train.generator_ema averages whole generator weights on every rank, and train.engine=fsdp shards "
                "them: use the EMA with train.engine=ddp or deepspeed, or train.generator_ema=0 with fsdp"
            )


def normalise_gateway(url: str) -> str:
    """``host:port`` or an http(s) URL; anything else is a configuration error (ValueError)."""
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"log.pushgateway={url!r} is not an http(s) address; use e.g. http://pushgateway:9091")
    try:
        parsed.port  # noqa: B018 -- urllib checks the port only when it is read (at the first push, too late)
    except ValueError:
        raise ValueError(f"log.pushgateway={url!r}: the port must be a number in 0-65535, e.g. :9091") from None
    return parsed.geturl()


@dataclass
class LogConfig:
    every: int = field(default=25, metadata={"range": "[1, 1e12]"})  # steps between metric reductions (device syncs)
    progress: bool = True
    # Local rank r serves on port + r; 0 picks free ports; -1 disables.
    prometheus_port: int = field(default=9400, metadata={"range": "[-1, 65535]"})
    prometheus_addr: str = "127.0.0.1"  # 0.0.0.0 to be scraped from another host (multi-node)
    # A folder for Prometheus file_sd target files, one per rank (deploy/prometheus/prometheus.yml
    # reads deploy/prometheus/targets); empty: none written.
    prometheus_targets: str = field(default="", metadata=PATH_FIELD)
    # A Pushgateway (http://host:9091) that receives the evaluation results and the final step at
    # each evaluation and at exit, so that they outlive the process; empty: no push.
    pushgateway: str = ""
    # Experiment trackers, through accelerate: tensorboard (event files in <run>/tensorboard) and
    # wandb (offline unless WANDB_MODE says otherwise); each needs its package installed.
    trackers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1, got {self.every}")
        if not -1 <= self.prometheus_port <= 65535:
            port = self.prometheus_port
            raise ValueError(f"log.prometheus_port must be -1 (off), 0 (a free port) or a port, got {port}")
        if self.pushgateway:
            normalise_gateway(self.pushgateway)
            if self.prometheus_port == -1:  # the exporter holds what is pushed: nothing was, without a word
                raise ValueError(
                    "log.pushgateway pushes the Prometheus exporter's numbers, and log.prometheus_port=-1 turns "
                    "the exporter off: set log.prometheus_port=0 (any free port) or a port, or drop log.pushgateway"
                )
        unknown = [t for t in self.trackers if t not in ("tensorboard", "wandb")]
        if unknown or len(set(self.trackers)) < len(self.trackers):
            raise ValueError(f"log.trackers takes tensorboard and wandb, each once; got {self.trackers}")


@dataclass
class CheckpointConfig:
    every: int = field(default=500, metadata={"range": "[1, 1e12]"})
    keep: int = field(default=3, metadata={"range": "[1, 1000000]"})
    resume: bool = True  # resume from the run folder's latest checkpoint when there is one

    def __post_init__(self) -> None:
        for key, value in (("checkpoint.every", self.every), ("checkpoint.keep", self.keep)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")


class DeepSpeedConfigError(UserError, ValueError):
    """A DeepSpeed setting that cannot work; the message names it and the fix."""


# Why ZeRO-3 is refused: it partitions parameters and gathers them in forward hooks, and the
# gradient penalty differentiates through E twice (autograd.grad with create_graph, then backward);
# DeepSpeed's stage-3 hooks do not support that double backward (verified: it fails).
ZERO3_REFUSAL = (
    "ZeRO stage 3 is not supported: the gradient penalty needs a double backward through E "
    "(autograd.grad with create_graph=True, then backward), and ZeRO-3's parameter "
    "partitioning hooks fail under double backward. Use deepspeed.zero_stage 0, 1 or 2."
)


@dataclass
class DeepSpeedConfig:
    """Used when train.engine=deepspeed. Precision and batch sizes come from train/data; the JSON file
    (optional, e.g. deploy/deepspeed/zero2.json) supplies DeepSpeed's other knobs."""

    zero_stage: int = field(default=1, metadata={"range": "[0, 3]"})  # 0, 1 or 2; 3 is refused (ZERO3_REFUSAL)
    # A DeepSpeed JSON; its zero_optimization.stage, if set, must equal zero_stage.
    config_file: str = field(default="", metadata=PATH_FIELD)

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise DeepSpeedConfigError(f"deepspeed.zero_stage=3: {ZERO3_REFUSAL}")
        if self.zero_stage not in (0, 1, 2):
            raise DeepSpeedConfigError(f"deepspeed.zero_stage={self.zero_stage} is not valid; choose 0, 1 or 2")


# A run's name is a folder under runs/: letters, digits, ".", "_" and "-", no path separator, no "..".
RUN_NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


@dataclass
class RunConfig:
    name: str = field(
        default="meg",
        metadata={"pattern": RUN_NAME_PATTERN, "valid": "letters, digits, '.', '_', '-' (at most 128), no '..'"},
    )
    output_dir: str = field(default="", metadata=PATH_FIELD)  # default: runs/<name>
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
        # The configuration is saved with the run and in every checkpoint, and logged: a secret in it
        # would travel with every copy of them.
        for key, value in _strings(dataclasses.asdict(self)):
            secret = secret_in_url(value)
            if secret:
                raise ConfigError(
                    f"{key}={redacted_url(value)} carries a credential ({secret}): it would be written into "
                    "config.yaml, every checkpoint and the logs. Keep the URL plain and give the credential to "
                    "fsspec through the environment (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3://) or "
                    "its configuration file (~/.config/fsspec/*.json)."
                )


# Query parameters that carry a credential: presigned S3 (X-Amz-*), Azure SAS (sig), GCS (Signature),
# and the usual names.
SECRET_QUERY_PARAMETERS = {"sig", "signature", "token", "access_token", "password", "secret", "key", "api_key"}


def _url_parts(value: str) -> Iterator[urllib.parse.SplitResult]:
    """The URLs in a setting: several may be joined by "::" (shard lists, fsspec's chained URLs)."""
    for part in value.split("::"):
        parsed = urllib.parse.urlsplit(part.strip())
        if parsed.scheme and parsed.netloc:
            yield parsed


def _is_secret_parameter(name: str) -> bool:
    name = name.lower()
    return name in SECRET_QUERY_PARAMETERS or name.startswith("x-amz-") or name.endswith("token")


def secret_in_url(value: str) -> str | None:
    """What credential a URL in ``value`` carries, or None: a password (or, over HTTP, any user
    part, which is a token there), or a query parameter that signs or authorises the request."""
    for url in _url_parts(value):
        if url.password is not None or (url.username and url.scheme in ("http", "https")):
            return f"the user part of {url.scheme}://{url.hostname}"
        for name, _ in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
            if _is_secret_parameter(name):
                return f"the query parameter {name}"
    return None


def redacted_url(value: str) -> str:
    """``value`` with every URL's user part and secret query values replaced by ***: safe to print."""
    parts = []
    for part in value.split("::"):
        url = urllib.parse.urlsplit(part.strip())
        if url.scheme and url.netloc:
            netloc = url.netloc.rpartition("@")[2]
            if url.username is not None:
                netloc = f"***@{netloc}"
            query = "&".join(
                f"{name}=***" if _is_secret_parameter(name) else f"{name}={v}"
                for name, v in urllib.parse.parse_qsl(url.query, keep_blank_values=True)
            )
            part = urllib.parse.urlunsplit((url.scheme, netloc, url.path, query, url.fragment))
        parts.append(part)
    return shown("::".join(parts))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against a field's annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            named = ", ".join(str(c) if c != "" else "'' (none)" for c in choices)
            raise ConfigError(f"{key}={shown(value)} is not valid; choose one of {named}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {annotation.__name__} fields, got {shown(value)}")
        return _build(annotation, value, key)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            # A single item is the usual slip (log.trackers=tensorboard): show the list it would be.
            single = isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != ""
            hint = f" (a list: {key}=[{value}])" if single else ""
            raise ConfigError(f"{key} must be a list of {item.__name__}, got {shown(value)}{hint}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {annotation}, got {shown(value)}")
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
        field_name = key.rsplit(".", 1)[-1]
        quote = f": quote it in the YAML file, {field_name}: '{value}'" if annotation is str and "[" not in key else ""
        raise ConfigError(f"{key} must be {annotation.__name__}, got {shown(value)} ({type(value).__name__}){quote}")
    return value


def _annotation_of(dotted: str) -> Any:
    """The type of the RunConfig field ``dotted`` names (None: no such field)."""
    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


# Every int and float field (and list of them) of a configuration dataclass declares its valid values
# in its metadata, checked here at load with the key named (tests/test_config.py walks every section):
#   "range": "[lo, hi]" / "(lo, hi)" / mixed: the interval; NaN and infinities are always outside
#   "length": an interval for the number of items of a list
#   "pattern": a regular expression a string must match in full ("valid": what it allows, in words)
_RANGE_RE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def parse_range(spec: str) -> tuple[float, float, bool, bool]:
    """(low, high, low included, high included) of a range like ``"[0, 1)"``."""
    m = _RANGE_RE.match(spec.strip())
    if m is None:
        raise ValueError(f"not a range: {spec!r} (write e.g. '[0, 1)' or '(0, inf)')")
    return float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"


def in_range(value: float, spec: str) -> bool:
    lo, hi, lo_in, hi_in = parse_range(spec)
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)


def _count(spec: str) -> str:
    lo, hi, lo_in, hi_in = parse_range(spec)
    if lo == hi:
        return f"exactly {lo:g}"
    return f"at least {lo:g}" if math.isinf(hi) else f"a number in {spec}"


def check_field(key: str, value: Any, f: dataclasses.Field) -> None:
    """Raises ConfigError when ``value`` is outside what field ``f``'s metadata allows."""
    meta = f.metadata
    if "length" in meta and isinstance(value, list) and not in_range(len(value), meta["length"]):
        raise ConfigError(f"{key} must have {_count(meta['length'])} items, got {len(value)}: {shown(value)}")
    if "range" in meta:
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if v is not None and not in_range(v, meta["range"]):
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{where}={shown(v)} is out of range: it must be a finite number in {meta['range']}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        valid = meta.get("valid") or f"it must match {meta['pattern']}"
        raise ConfigError(f"{key}={shown(value)} is not valid: {valid}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        try:
            if key not in fields:
                raise ConfigError(f"unknown config key {shown(full)}; valid keys here: {', '.join(fields)}")
            default = fields[key].default_factory
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and default is not dataclasses.MISSING:
                # A section given in part keeps its own default for the rest: train.negatives_mala's steps
                # are 5, not MALAConfig's 0, when only its temperature is set.
                value = _merge(dataclasses.asdict(default()), value)
            kwargs[key] = _coerce(full, value, hints[key])
            if fields[key].metadata.get("path") and isinstance(kwargs[key], str):
                kwargs[key] = expand_home(kwargs[key])
            check_field(full, kwargs[key], fields[key])
        except ConfigError as e:
            if e.key is None:  # the innermost setting's
                e.key = full
            raise
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def config_from_yaml(text: str, source: str) -> RunConfig:
    """The RunConfig a saved config.yaml (``text``, read from ``source``) describes; ConfigError naming
    ``source`` when it does not describe one."""
    tree = parse_yaml(text, source)
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must hold a mapping of config sections, got {type(tree).__name__}")
    try:
        return _build(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {shown(dotted)}: {shown(part)} is not a section")
        node = child
    # A section given whole (train={steps: 5}) is merged like a preset's: it replaced the section, and
    # every other setting of the preset's fell back to the code's default without a word.
    old = node.get(parts[-1])
    node[parts[-1]] = _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


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
    raise ConfigError(f"no config file or preset {shown(name_or_path)}; presets: {', '.join(available)}")


def _read_preset(
    name_or_path: str, chain: tuple[str, ...] = (), origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """A preset's tree, with its ``base:`` presets merged underneath it; ``origins`` (when given) gets each
    setting's dotted key -> the file that set it (a base's, unless overridden)."""
    path = resolve_preset(name_or_path)
    if os.path.realpath(path) in map(os.path.realpath, chain):
        raise ConfigError(f"presets inherit in a circle: {' -> '.join([*chain, path])}")
    tree = read_yaml_file(path)
    if tree is None:  # empty, comments only, or `null`: a truncated preset would train every default unsaid
        raise ConfigError(
            f"{path} holds no settings (an empty file): fill it, or start it from a preset (base: toy_25gaussians)"
        )
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one preset (a name in configs/ or a path), got {shown(base)}")
    merged = tree if base is None else _merge(_read_preset(_base_of(path, base), (*chain, path), origins), tree)
    if origins is not None:
        origins.update((key, path) for key, _ in leaves(tree))
    return merged


def _base_of(path: str, base: str) -> str:
    """Where the preset at ``path`` inherits from: a file beside it (``base: mine`` finds mine.yaml in its
    folder, wherever the run starts), else a path from the working folder or a preset in configs/."""
    beside = os.path.join(os.path.dirname(path), base)
    for candidate in (beside, beside + ".yaml"):
        if os.path.isfile(candidate):
            return candidate
    try:
        return resolve_preset(base)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}; or a file beside it") from None


def leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each setting of a nested tree as (dotted key, value); an empty section is a setting of its own."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (a list or a value replaces the base's)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    origins: dict[str, str] = {}  # a preset's settings -> the file that set each
    tree: dict[str, Any] = _read_preset(preset, origins=origins) if preset else {}
    preset_model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    preset_arch, overridden = preset_model.get("arch", "mlp"), set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)} must look like section.key=value (e.g. train.steps=1000)")
        key, raw = item.split("=", 1)
        try:
            # A text setting takes the text as typed: name=2024-01-01 was a date, output_dir=2024 an int.
            as_typed = raw == "" or _annotation_of(key.strip()) is str
            value = raw if as_typed else parse_yaml(raw, f"the value of {key.strip()}")
        except ConfigError:
            value = raw
        _set_dotted(tree, key.strip(), value)
        overridden.add(key.strip())
        origins = {k: v for k, v in origins.items() if k != key.strip() and not k.startswith(f"{key.strip()}.")}
    try:
        _check_arch_keys(tree.get("model"), preset_arch, overridden)
        return _build(RunConfig, tree)
    except ConfigError as e:
        # A preset's mistake names its file (with bases, one of several): the key alone sent users searching.
        # Origins are leaves: a misspelt section (trian:) is named by the first key the file set under it.
        key = e.key or ""
        source = origins.get(key) or next((v for k, v in origins.items() if key and k.startswith(f"{key}.")), None)
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


def _check_arch_keys(model: Any, preset_arch: str, overridden: set[str]) -> None:
    """A key of the other architecture is an error naming it, not ignored; except the preset's own
    widths when an override switches its architecture (model.arch=conv on an MLP preset): those go."""
    if not isinstance(model, dict) or model.get("arch", "mlp") not in ("mlp", "conv"):
        return  # an unknown architecture: the config's own check names it
    arch = model.get("arch", "mlp")
    unread = ModelConfig.keys_of_another_arch(model)
    if arch != preset_arch:
        for key in [k for k in unread if f"model.{k}" not in overridden]:
            del model[key]
        unread = [k for k in unread if f"model.{k}" in overridden]
    if unread:
        keys = ", ".join(f"model.{k}" for k in unread)
        error = ConfigError(
            f"{keys}: not read by model.arch={arch}, only by the other architecture; remove "
            f"{'them' if len(unread) > 1 else 'it'} (from the overrides, or the preset and its base), "
            "or pick the architecture that reads it"
        )
        error.key = f"model.{unread[0]}"
        raise error


def vera_settings(cfg: RunConfig):
    """VERA's settings when it is the run's entropy estimator (build_networks' ``vera``), else None."""
    return cfg.train.entropy.vera if cfg.train.entropy_estimator == "vera" else None


def _strings(tree: dict[str, Any]) -> Iterator[tuple[str, str]]:
    return ((key, value) for key, value in leaves(tree) if isinstance(value, str))


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
    from data_pipeline.shards import ALLOW_COMMANDS_ENV, is_command_url  # the loader itself reads no data code

    if not allow_pipe:
        for key, value in _strings(dataclasses.asdict(cfg)):
            if is_command_url(value):
                raise ConfigError(
                    f"{key}={shown(value)} runs a program when it is opened: refused. Pass --allow-pipe on the command "
                    "line to allow it."
                )
    if cfg.eval.fid.inception and not trust_inception:
        raise ConfigError(
            f"eval.fid.inception={shown(cfg.eval.fid.inception)} is TorchScript, which runs code when it is loaded: "
            "refused. Pass --trust-inception on the command line to load it, or leave it empty for the packaged "
            "Inception."
        )
    for env, allowed in ((ALLOW_COMMANDS_ENV, allow_pipe), (TRUST_INCEPTION_ENV, trust_inception)):
        if allowed:
            os.environ[env] = "1"
        else:
            os.environ.pop(env, None)


def config_to_yaml(cfg: RunConfig, choices: bool = False) -> str:
    """The configuration as YAML that loads back to it, without the keys of the architecture it does not
    use (which a preset may not set); ``choices`` (``--print-config``): every key that takes one of a
    few values says which in a comment (``engine: ddp  # ddp | deepspeed``)."""
    tree = dataclasses.asdict(cfg)
    for key in ModelConfig.keys_of_another_arch(tree["model"]):
        del tree["model"][key]
    text = yaml.safe_dump(tree, sort_keys=False)
    if not choices:
        return text
    literal = dict(_choice_fields(RunConfig))
    lines, path = [], []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_]\w*):", line)
        if m:
            depth = len(m.group(1)) // 2
            path = [*path[:depth], m.group(2)]
            options = literal.get(".".join(path))
            if options:
                line += "  # " + " | ".join(map(str, options))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _choice_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, tuple]]:
    """(dotted key, choices) of every Literal field of ``cls`` and its sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) is Literal:
            yield prefix + f.name, typing.get_args(annotation)
        elif dataclasses.is_dataclass(annotation):
            yield from _choice_fields(annotation, f"{prefix}{f.name}.")
