"""Config: YAML round trip, overrides, and the error each kind of bad input gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fastbyol.config import Config, ConfigError, config_from_dict, config_reference, dump_yaml, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "data: {path: /x, batch_size: 512}\naugment: {view2: {solarize_p: 0.3}}\n"))
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    assert again.augment.view2.solarize_p == 0.3
    assert again.augment.view1.crop_scale == (0.08, 1.0)  # lists come back as tuples


def test_defaults_are_the_paper_values():
    cfg = Config()
    assert (cfg.model.depth, cfg.data.batch_size, cfg.byol.tau_base) == (50, 4096, 0.996)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.eta) == (0.9, 1.5e-6, 1e-3)
    assert cfg.optim.peak_lr(4096) == pytest.approx(0.2 * 4096 / 256)
    assert (cfg.augment.view1.blur_p, cfg.augment.view2.blur_p) == (1.0, 0.1)
    assert (cfg.augment.view1.solarize_p, cfg.augment.view2.solarize_p) == (0.0, 0.2)


def test_overrides_apply_after_the_file(tmp_path):
    path = write(tmp_path, "data: {path: /x}\noptim: {base_lr: 0.3}\n")
    cfg = load_config(path, ["optim.base_lr=0.5", "augment.view1.crop_scale=[0.2, 1.0]", "train.precision=fp32",
                             "optim.lr=1e-3"])
    assert cfg.optim.base_lr == 0.5
    assert cfg.augment.view1.crop_scale == (0.2, 1.0)
    assert cfg.train.precision == "fp32"
    assert cfg.optim.peak_lr(4096) == 1e-3  # an explicit lr wins over base_lr scaling


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("optim: {base_lrr: 0.1}\n", [], "unknown key optim.base_lrr in {file}; did you mean optim.base_lr?"),
        ("", ["trian.epochs=3"], "unknown key trian in the command line; did you mean train?"),
        ("", ["train.epochs=many"], "train.epochs = 'many': expected an integer"),
        ("", ["train.epochs=2.5"], "train.epochs = 2.5: expected an integer"),
        ("", ["model.channels_last=yes please"], "model.channels_last = 'yes please': expected true or false"),
        ("", ["optim.base_lr=-0.1"], "optim.base_lr = -0.1: expected a positive learning rate"),
        ("", ["byol.tau_base=1.5"], "byol.tau_base = 1.5: expected a value in [0, 1]"),
        ("", ["augment.view2.solarize_p=2"], "augment.view2.solarize_p = 2.0: expected a probability in [0, 1]"),
        ("", ["augment.view1.crop_scale=[0.5]"], "augment.view1.crop_scale = [0.5]: expected a list of 2 numbers"),
        ("", ["data.backend=tfrecord"], "data.backend = 'tfrecord': expected one of folder, synthetic, ffcv, dali"),
        ("", ["model.depth=51"], "model.depth = 51: expected 18, 34, 50, 101, 152 or 200"),
        ("", ["epochs"], "override 'epochs': expected key=value"),
        ("data: [1, 2]\n", [], "data in {file}: expected a mapping of keys"),
    ],
)
def test_bad_input_names_the_key(tmp_path, text, overrides, message):
    path = write(tmp_path, "data: {path: /x}\n" + text if not text.startswith("data") else text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message.format(file=path) in str(err.value)


def test_batch_must_split_across_ranks(tmp_path):
    path = write(tmp_path, "data: {path: /x, batch_size: 100}\n")
    load_config(path, world_size=4)
    with pytest.raises(ConfigError, match=r"data.batch_size = 100: not divisible by the number of ranks \(3\)"):
        load_config(path, world_size=3)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "data: {path: [\n"))


def test_reference_lists_every_key_and_readme_is_current():
    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    reference = config_reference()
    for key in keys(Config()):
        assert f"| `{key}` |" in reference
    assert reference in (ROOT / "README.md").read_text(), (
        "README.md's config reference is stale: paste the output of `python -m fastbyol.config` into it")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert isinstance(values, dict)
    load_config(ROOT / "configs" / name, ["data.path=/some/train"] if not values.get("data", {}).get("path") else [])


# The official presets as the paper's appendix / byol/configs/byol.py state them (batch 4096):
# epochs -> (base lr, weight decay, tau_base), 10 warm-up epochs each.
OFFICIAL_PRESETS = {1000: (0.2, 1.5e-6, 0.996), 300: (0.3, 1e-6, 0.99), 100: (0.45, 1e-6, 0.99), 40: (0.45, 1e-6, 0.97)}


@pytest.mark.parametrize("config", ["imagenet_r50_ffcv.yaml", "imagenet_r50_dali.yaml"])
@pytest.mark.parametrize("epochs", sorted(OFFICIAL_PRESETS))
def test_recipes_are_the_official_presets(config, epochs):
    lr, wd, tau = OFFICIAL_PRESETS[epochs]
    cfg = load_config(ROOT / "configs" / config, [f"recipe={epochs}ep"])
    got = (cfg.train.epochs, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.byol.tau_base, cfg.optim.warmup_epochs)
    assert got == (epochs, lr, wd, tau, 10.0)
    assert cfg.data.batch_size == 4096 and cfg.optim.peak_lr(4096) == pytest.approx(lr * 16)
    assert config_from_dict(to_dict(cfg)) == cfg  # a run's stored config reads back the same


def test_imagenet_configs_default_to_the_1000_epoch_recipe():
    for config in ("imagenet_r50_ffcv.yaml", "imagenet_r50_dali.yaml"):
        cfg = load_config(ROOT / "configs" / config)
        assert cfg.recipe == "1000ep"
        assert (cfg.train.epochs, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.byol.tau_base) == (1000, 0.2, 1.5e-6, 0.996)


def test_explicit_keys_override_the_recipe(tmp_path):
    path = write(tmp_path, "recipe: 300ep\ndata: {path: /x}\noptim: {base_lr: 0.5}\n")
    cfg = load_config(path, ["byol.tau_base=0.98"])
    assert (cfg.train.epochs, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.byol.tau_base) == (300, 0.5, 1e-6, 0.98)
    assert load_config(path, ["recipe=40ep"]).train.epochs == 40  # the command line's recipe wins


def test_unknown_recipe_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^recipe = '500ep': expected one of 1000ep, 300ep, 100ep, 40ep"):
        load_config(None, ["recipe=500ep"])


@pytest.mark.parametrize("override, message", [
    ("model.width=3", "model.width = 3: expected 1, 2 or 4"),  # the choices of fastbyol.models.resnet.WIDTHS
    ("train.precision=fp8", "train.precision = 'fp8': expected bf16, fp16 or fp32"),
    ("eval.image_size=4", "eval.image_size = 4: expected 0 (the training crop size) or >= 8"),
    ("data.dali.hw_decoder_load=2", "data.dali.hw_decoder_load = 2.0: expected a value in [0.0, 1.0]"),
    ("data.ffcv.order=sorted", "data.ffcv.order = 'sorted': expected random or quasi_random"),
])
def test_each_check_sits_with_its_default(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.backend=synthetic", override])
    assert str(err.value) == message


def test_model_choices_are_the_resnet_tables():
    from fastbyol.models.resnet import STAGES, STEMS, WIDTHS

    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(load_config(None, ["data.backend=synthetic"]).model)
              if "check" in f.metadata}
    assert all(checks["depth"](d) for d in STAGES) and not checks["depth"](51)
    assert all(checks["width"](w) for w in WIDTHS) and all(checks["stem"](s) for s in STEMS)


@pytest.mark.parametrize(
    "text, message",
    [
        # a second section block: PyYAML keeps the last, so the first block's keys would revert to defaults
        ("data: {path: /x}\noptim:\n  weight_decay: 0.1\n  warmup_epochs: 2\ntrain: {epochs: 3}\noptim:\n  base_lr: 0.3\n",
         "{file}: key optim appears twice (lines 2 and 6)"),
        ("data: {path: /x}\noptim:\n  base_lr: 0.3\n  base_lr: 0.4\n", "{file}: key optim.base_lr appears twice (lines 3 and 4)"),
        ("data: {path: /x, path: /y}\n", "{file}: key data.path appears twice (lines 1 and 1)"),
    ],
)
def test_a_duplicate_yaml_key_is_refused_with_its_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    assert yaml.safe_load(text)  # plain PyYAML takes it silently: the fault this refuses
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message.format(file=path) in str(err.value)


def test_a_duplicate_key_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match=r"augment.view1=.*key crop_size appears twice"):
        load_config(None, ["augment.view1={crop_size: 96, crop_size: 64}"])


def test_a_yaml_merge_key_may_still_override_what_it_merges(tmp_path):
    # `<<: *base` followed by an explicit key is YAML's way to override: not a duplicate
    text = "data: {path: /x}\naugment:\n  view1: &v {crop_size: 96, blur_p: 0.5}\n  view2:\n    <<: *v\n    blur_p: 0.1\n"
    cfg = load_config(write(tmp_path, text))
    assert (cfg.augment.view2.crop_size, cfg.augment.view2.blur_p) == (96, 0.1)
