"""The whole run as typed dataclasses: YAML in, `a.b.c=value` overrides, strict errors out.

Every section validates its own values; `load_config` rejects unknown keys (naming the file and
the closest valid key) and wrong types (naming the key and the expected type) before any work
starts. `config_reference()` renders every key with its default and comment for README.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastbyol.models.resnet import STAGES, STEMS, WIDTHS
from pipelines.loader import DataConfig
from pipelines.params import at_least, check_fields, choice, in_range, param
from pipelines.policy import AugmentConfig


class ConfigError(ValueError):
    """A bad config value: the message names the key (and file) and what was expected."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # the last two: no code generation (CPU tests, debugging)
PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ModelConfig:
    depth: int = choice(50, STAGES)  # ResNet depth: 18, 34, 50, 101, 152 or 200
    width: int = choice(1, WIDTHS)  # width multiplier: 1, 2 or 4 (the paper's 1x, 2x, 4x)
    stem: str = choice("imagenet", STEMS)  # imagenet (7x7/2 conv + maxpool) | cifar (3x3/1 conv, for small images)
    # Default True, as the released official code: byol/utils/networks.py builds its ResNet from
    # hk.nets.ResNet.BlockGroup, whose BlockV1 makes the bottleneck's last BatchNorm with
    # scale_init=jnp.zeros (dm-haiku haiku/_src/nets/resnet.py). We found no official statement or
    # issue thread that the paper's runs used gamma = 1, so the code we can read decides.
    zero_init_residual: bool = True  # last BN gamma of each bottleneck block starts at 0 (official code); false: 1
    channels_last: bool = True  # NHWC memory format for the encoder and the views
    compile: bool = False  # torch.compile the online and the target network, each its own graph (the loss stays eager)
    compile_mode: str = choice("default", COMPILE_MODES)  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    compile_backend: str = choice("inductor", COMPILE_BACKENDS)  # inductor | aot_eager | eager (no code generation: tests, debugging)

    def validate(self) -> None:
        check_fields(self, "model")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(f"model.compile_mode = {self.compile_mode!r} needs model.compile_backend = 'inductor' "
                             f"(got {self.compile_backend!r}): modes are inductor's")


@dataclass
class BYOLConfig:
    hidden_dim: int = at_least(4096, 1, "a positive size")  # projector and predictor hidden width
    proj_dim: int = at_least(256, 1, "a positive size")  # projection (and prediction) output size
    tau_base: float = in_range(0.996, 0.0, 1.0, "a value in [0, 1]")  # target EMA rate at step 0; cosine-increased to 1 at the end
    concat_views: bool = False  # one encoder call on both views (BN statistics over both views)

    def validate(self) -> None:
        check_fields(self, "byol")


@dataclass
class OptimConfig:
    base_lr: float = param(0.2, lambda v: v > 0, "a positive learning rate")  # peak lr = base_lr * global batch / 256 (the paper's rule)
    lr: float = at_least(0.0, 0.0, "a positive learning rate (or 0 to use base_lr)")  # if > 0: the peak lr as given, ignoring base_lr and the batch scaling
    momentum: float = param(0.9, lambda v: 0.0 <= v < 1.0, "a value in [0, 1)")
    weight_decay: float = at_least(1.5e-6, 0.0, ">= 0")  # on conv/linear weights only (biases and BN excluded)
    eta: float = param(1e-3, lambda v: v > 0, "a positive trust coefficient")  # LARS trust coefficient (biases and BN excluded from adaptation)
    lars: bool = True  # false: no trust ratio on any group (plain SGD with momentum; weight decay as above)
    predictor_lr_scale: float = param(1.0, lambda v: v > 0, "a positive factor")  # the predictor's lr = this x the scheduled lr (1: the paper)
    predictor_lr_hold: bool = False  # true: after warm-up the predictor's lr stays at its peak, no cosine (SimSiam's fixed predictor lr)
    warmup_epochs: float = at_least(10.0, 0.0, ">= 0")  # linear warm-up, then cosine decay to 0

    def validate(self) -> None:
        check_fields(self, "optim")

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr > 0 else self.base_lr * global_batch / 256


@dataclass
class TrainConfig:
    epochs: int = at_least(1000, 1, "at least 1")  # the paper: 1000 (`recipe` sets it together with lr, weight decay and tau)
    max_steps: int = at_least(0, 0, ">= 0 (0 = epochs)")  # if > 0: stop after this many steps; the schedules span max_steps
    precision: str = choice("bf16", PRECISIONS)  # bf16 (autocast) | fp16 (autocast + grad scaler) | fp32
    device: str = choice("auto", DEVICES)  # auto (cuda when available) | cuda | cpu
    seed: int = 0  # model init, data order, crops and augmentations all derive from it
    run_dir: str = "runs/byol"  # checkpoints, metrics.jsonl, config.yaml, encoder.pt
    checkpoint_every: int = at_least(1000, 1)  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = at_least(3, 1)  # newest checkpoints kept in run_dir
    resume: str = choice("auto", ("auto", "never"))  # auto (continue from run_dir's newest checkpoint if any) | never
    cudnn_benchmark: bool = True

    def validate(self) -> None:
        check_fields(self, "train")


@dataclass
class LoggingConfig:
    progress: str = choice("auto", ("auto", "rich", "plain", "none"))  # auto (rich bar on a terminal, plain lines otherwise) | rich | plain | none
    log_every: int = at_least(20, 1)  # steps between metric reads (each read synchronises with the device)
    plot: bool = True  # write metrics.png at the end (needs matplotlib)
    tensorboard: bool = False  # also write TensorBoard events (metrics.jsonl's scalars, views.png) to RUN_DIR/tensorboard; pip install 'fastbyol[tensorboard]'

    def validate(self) -> None:
        check_fields(self, "logging")


@dataclass
class DistConfig:
    sync_bn: bool = True  # BatchNorm statistics over the global batch: torch SyncBatchNorm on GPUs, CPUSyncBatchNorm (gloo) on CPUs
    sync_bn_group_size: int = at_least(0, 0, ">= 0 (0 = all ranks)")  # with sync_bn: BatchNorm statistics over groups of this many consecutive ranks (e.g. 8 = one node); 0 = all ranks (the paper); see docs/scaling.md
    bucket_cap_mb: int = at_least(25, 1)  # DDP gradient bucket size
    static_graph: bool = False  # DDP static_graph (the same parameters are used every step)
    gradient_as_bucket_view: bool = False  # DDP grads are views into the all-reduce buckets (no copy, less memory)
    timeout_s: float = param(1800.0, lambda v: v > 0, "a positive number of seconds")  # seconds a collective waits for every rank; then each rank exits naming the lost ones

    def validate(self) -> None:
        check_fields(self, "dist")


@dataclass
class EvalConfig:
    knn_every: int = at_least(0, 0, ">= 0 (0 = off)")  # epochs between kNN evaluations during training (0 = off); logged as knn_top1, knn_top5
    train_path: str = ""  # labeled ImageFolder whose features are the kNN bank (e.g. the train split)
    val_path: str = ""  # labeled ImageFolder classified by the kNN vote (e.g. the val split)
    k: int = at_least(20, 1)  # neighbours per vote (kNN)
    temperature: float = param(0.07, lambda v: v > 0, "> 0")  # vote weight exp(cosine / temperature)
    batch_size: int = at_least(256, 1)  # images per feature-extraction forward, per rank
    image_size: int = param(0, lambda v: v == 0 or v >= 8, "0 (the training crop size) or >= 8")  # test center-crop size (0 = the training crop size); resize 256/224 from 128 px up
    num_workers: int = at_least(4, 0)  # CPU workers decoding the eval images, per rank

    def validate(self) -> None:
        check_fields(self, "eval")
        if self.knn_every and not (self.train_path and self.val_path):
            raise ConfigError(f"eval.knn_every = {self.knn_every} needs eval.train_path and eval.val_path "
                              f"(labeled ImageFolders); got {self.train_path!r} and {self.val_path!r}")


# The official ImageNet presets (deepmind-research byol/configs/byol.py: _LR_PRESETS, _WD_PRESETS,
# _EMA_PRESETS at batch 4096, 10 warm-up epochs each). A recipe sets these keys' values before the
# YAML file and the command line are read, so a key given explicitly still wins.
RECIPES: dict[str, dict[str, dict[str, float]]] = {
    f"{epochs}ep": {
        "train": {"epochs": epochs},
        "optim": {"base_lr": lr, "weight_decay": wd, "warmup_epochs": 10.0},
        "byol": {"tau_base": tau},
    }
    for epochs, lr, wd, tau in ((1000, 0.2, 1.5e-6, 0.996), (300, 0.3, 1e-6, 0.99), (100, 0.45, 1e-6, 0.99), (40, 0.45, 1e-6, 0.97))
}


@dataclass
class Config:
    recipe: str = ""  # official ImageNet preset 1000ep / 300ep / 100ep / 40ep: sets train.epochs, optim.base_lr, optim.weight_decay, byol.tau_base, optim.warmup_epochs ('' = none)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int = 1) -> None:
        """Check every section; ValueErrors of the sections become ConfigErrors."""
        if self.recipe and self.recipe not in RECIPES:
            raise ConfigError(f"recipe = {self.recipe!r}: expected one of {', '.join(RECIPES)} (or '' for none)")
        for section in (f for f in dataclasses.fields(self) if f.name != "recipe"):
            try:
                getattr(self, section.name).validate()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e)) from None
        group = self.dist.sync_bn_group_size
        if world_size > 1 and group and world_size % group:
            raise ConfigError(f"dist.sync_bn_group_size = {group}: does not divide the number of ranks ({world_size}) "
                              "into equal groups")
        if self.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size = {self.data.batch_size}: not divisible by the number of ranks ({world_size})"
            )


# ---------------------------------------------------------------- dict <-> dataclass, strictly


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key` and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} = {value!r}: expected a list of {len(args)} numbers")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a bug in the dataclasses


def _update(obj: Any, values: dict, prefix: str, source: str) -> None:
    """Set the fields of dataclass `obj` from `values`, recursing into nested sections."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key {key} in {source}{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _update(current, value, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last one
    silently, so a second `optim:` block would reset every key of the first to its default."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias: its node was checked where it was anchored
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{prefix}[{i}].", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[tuple[str, str], int] = {}  # (tag, text) of each key -> its line
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then explicit keys: overriding is its purpose
            continue
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
        line = key_node.start_mark.line + 1
        if isinstance(key_node, yaml.ScalarNode) and (key_node.tag, name) in lines:
            raise ConfigError(f"key {prefix}{name} appears twice (lines {lines[key_node.tag, name]} and {line}); "
                              "the second would silently replace the first: keep one")
        lines[key_node.tag, name] = line
        _refuse_duplicate_keys(value_node, f"{prefix}{name}.", seen_nodes)


def load_yaml(text: str, source: str) -> Any:
    """`text` parsed as YAML (safe types only); a syntax error or a duplicate key raises a
    ConfigError naming `source` and the line(s)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key such as optim.base_lr")
    return key.split("."), load_yaml(raw, f"override {text!r}") if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), world_size: int = 1) -> Config:
    """The config of YAML file `path` (defaults where absent) with `a.b.c=value` overrides applied.

    A `recipe` (from the file or the command line, the latter winning) first sets its keys; every
    key the file or the command line gives explicitly then overrides it.
    """
    layers: list[tuple[dict, str]] = []  # (values, where they come from), in the order applied
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = load_yaml(path.read_text(), str(path)) or {}
        layers.append((values, str(path)))
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        layers.append((nested, "the command line"))
    cfg = _with_recipe(layers)
    for values, source in layers:
        _update(cfg, values, "", source)
    cfg.validate(world_size)
    return cfg


def _with_recipe(layers: list[tuple[dict, str]]) -> Config:
    """Defaults, then the values of the last `recipe` named in `layers` (none: plain defaults)."""
    cfg = Config()
    for values, source in layers:
        if isinstance(values, dict) and "recipe" in values:
            _update(cfg, {"recipe": values["recipe"]}, "", source)
    if cfg.recipe:
        if cfg.recipe not in RECIPES:
            cfg.validate()  # raises the one-line error naming the valid recipes
        _update(cfg, RECIPES[cfg.recipe], "", f"recipe {cfg.recipe}")
    return cfg


def config_from_dict(values: dict) -> Config:
    """A Config from a plain dict (e.g. the one stored in a checkpoint)."""
    cfg = _with_recipe([(values, "the stored config")])
    _update(cfg, values, "", "the stored config")
    cfg.validate()
    return cfg


def load_run_config(run_dir: str | Path) -> Config:
    """The config stored in a run directory (its config.yaml), validated."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {path} does not exist")
    return config_from_dict(load_yaml(path.read_text(), str(path)))


def to_dict(cfg: Config) -> dict:
    """Plain, YAML-safe dict (tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- the reference, from the source


def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source -> {name: comment}."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def config_reference() -> str:
    """A Markdown table of every key, its default and its comment, generated from the dataclasses."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(obj: Any, prefix: str) -> None:
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            shown = list(value) if isinstance(value, tuple) else value
            if isinstance(shown, list):
                shown = [round(x, 4) if isinstance(x, float) else x for x in shown]
            rows.append(f"| `{prefix}{f.name}` | `{yaml.safe_dump(shown, default_flow_style=True).strip().removesuffix('...').strip()}` | {comments.get(f.name, '').replace('|', '/')} |")

    walk(Config(), "")
    return "\n".join(rows)


def update_readme(path: Path) -> None:
    """Replace the table between README's config-reference markers with the current reference."""
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    text = Path(path).read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    Path(path).write_text(f"{head}{start}\n{config_reference()}\n{end}{tail}")


if __name__ == "__main__":  # python -m fastbyol.config [README.md]: print the reference, or update README
    import sys

    if len(sys.argv) > 1:
        update_readme(Path(sys.argv[1]))
    else:
        print(config_reference())
