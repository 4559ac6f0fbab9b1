"""The schema: recipes, overrides, validation and the errors a user sees."""

from pathlib import Path

import pytest

from powergrad_train.config import BUNDLED_RECIPES, KEYS, build_config, check_runtime, describe_keys
from powergrad_train.errors import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_overrides():
    cfg = build_config(None, ["schedule.epochs=2", "schedule.warmup_epochs=1", "schedule.cooldown_epochs=0",
                              "loss.pgt_alpha=0.25", "optim.lr=1", "amp=bf16"])
    assert cfg.schedule.epochs == 2 and cfg.loss.pgt_alpha == 0.25 and cfg.amp == "bf16"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.name == "resnet50"  # untouched default


def test_amp_off_unquoted(tmp_path):
    assert build_config(str(write(tmp_path, "r.yaml", "amp: off\n"))).amp == "off"
    assert build_config(None, ["amp=off"]).amp == "off"
    with pytest.raises(ConfigError, match="amp = True is not allowed"):  # YAML's reading of a bare on
        build_config(None, ["amp=on"])


def test_base_recipe_and_override_order(tmp_path):
    write(tmp_path, "base.yaml", "model: {name: resnet18}\nschedule: {epochs: 90, name: step}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nschedule: {epochs: 20}\nloss: {pgt_alpha: 0.3}\n")
    cfg = build_config(str(child), ["loss.pgt_alpha=null"])
    assert (cfg.model.name, cfg.schedule.name, cfg.schedule.epochs) == ("resnet18", "step", 20)
    assert cfg.loss.pgt_alpha is None


@pytest.mark.parametrize("text,message", [
    ("model: {nmae: resnet18}", "unknown config key 'model.nmae' (did you mean model.name?)"),
    ("optim: {lr: fast}", "optim.lr = 'fast' must be a number"),
    ("schedule: {epochs: 2.5}", "schedule.epochs = 2.5 must be a whole number"),
    ("loss: {pgt_alpha: 0}", "loss.pgt_alpha = 0 is out of range: must be in (0.0, 1.0]"),
    ("amp: fp32", "amp = 'fp32' is not allowed: one of off, fp16, bf16"),
    ("model: resnet18", "'model' is a section and needs keys under it"),
    ("channels_last: 1", "channels_last = 1 must be true or false"),
    ("grad_clip: {mode: agc}", "grad_clip.mode is 'agc' but grad_clip.value is not set"),
    ("schedule: {epochs: 5, warmup_epochs: 3, cooldown_epochs: 3}", "exceed schedule.epochs (5)"),
    ("schedule: {epochs: 5}", "schedule.warmup_epochs (5) + schedule.cooldown_epochs (10) exceed"),
    ("optim: {momentum: 0}", "optim.nesterov needs optim.momentum > 0"),
    ("- a\n- b", "a recipe must be a mapping"),
    ("model: {name: [unclosed", "not valid YAML"),
])
def test_recipe_errors_say_what_and_where(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        build_config(str(path))
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"--set optim\.lrr=1: unknown config key 'optim\.lrr' \(did you mean optim\.lr\?\)"):
        build_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        build_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"--set data.batch_size=-4: data.batch_size = -4 is out of range: must be >= 1"):
        build_config(None, ["data.batch_size=-4"])


def test_recipe_not_found_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: 'nope.yaml'.*smoke.yaml"):
        build_config("nope.yaml")
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        build_config(str(tmp_path / "a.yaml"))


def test_bundled_recipes_resolve_by_name_and_train_what_their_names_say():
    rows = [p for p in sorted(BUNDLED_RECIPES.glob("*.yaml")) if p.stem not in ("smoke", "imagenet", "imagenet_step")]
    assert len(rows) == 28  # one recipe per row of Tables 1-3 (Table 3's rows shared with Table 1)
    for path in rows:
        cfg, name = build_config(path.name), path.stem
        model = "resnet18_nobn" if name.startswith("nobn") else name.split("_")[0]
        assert cfg.model.name == model, name
        assert (cfg.loss.pgt_alpha is not None) == ("pgt" in name), name
        assert (cfg.loss.label_smoothing == 0.1) == ("_ls" in name), name
        assert cfg.schedule.name == ("step" if "_step" in name else "cosine"), name
        assert cfg.grad_clip.mode == ("agc" if "_agc" in name else "value" if "_gc" in name else "none"), name
        assert cfg.data.root == "/data/imagenet" and cfg.model.num_classes == 1000, name
        # what the authors' code ran: its LR sequence, no zero init, timm's PIL validation at the model's
        # default interpolation
        assert cfg.schedule.mode == "authors_per_epoch" and not cfg.model.zero_init_last, name
        assert (cfg.schedule.warmup_lr, cfg.schedule.min_lr) == (0.01, 1e-4), name
        assert cfg.data.val_backend == "torchvision", name
        bicubic = model in ("resnet50", "resnet101", "seresnet18", "seresnet50")
        assert cfg.data.val_interpolation == ("bicubic" if bicubic else "bilinear"), name


def test_runtime_checks():
    cfg = build_config(None, ["data.batch_size=10", "train.accumulate_steps=2"])
    check_runtime(cfg, world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="does not split evenly over 3 process"):
        check_runtime(cfg, world_size=3, cuda=False)
    with pytest.raises(ConfigError, match="does not split evenly over 2 process.*multiple of 4"):
        check_runtime(cfg, world_size=2, cuda=False)
    with pytest.raises(ConfigError, match="model.sync_bn needs CUDA GPUs"):
        check_runtime(build_config(None, ["model.sync_bn=true"]), world_size=2, cuda=False)
    check_runtime(build_config(None, ["model.sync_bn=true"]), world_size=1, cuda=False)  # no-op alone
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        check_runtime(build_config(None, ["amp=fp16"]), world_size=1, cuda=False)


def test_help_lists_every_key_with_type_default_and_range():
    text = describe_keys()
    for key in KEYS:
        assert f"  {key} (" in text
    assert "loss.pgt_alpha (float or null, default null; in (0.0, 1.0])" in text


def test_numbers_written_as_people_write_them(tmp_path):
    cfg = build_config(str(write(tmp_path, "r.yaml", "optim:\n  lr: 1e-3\n  weight_decay: 5E-5\n")))
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 5e-5
    assert build_config(None, ["optim.weight_decay=5e-5"]).optim.weight_decay == 5e-5
    assert build_config(None, ["model.name=1e3x"]).model.name == "1e3x"  # only whole numbers in e-notation


@pytest.mark.parametrize("text,message", [
    ("optim:\n  lr: 0.1\nmodel:\n  name: resnet18\noptim:\n  momentum: 0.8\n",
     r"r\.yaml:5: not valid YAML \('optim' is given twice \(first on line 1\)\)"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", r"r\.yaml:3: not valid YAML \('lr' is given twice \(first on line 2\)\)"),
    ("", r"r\.yaml: the recipe is empty \(it would train every default\)"),
    ("# only a comment\n", r"r\.yaml: the recipe is empty"),
])
def test_recipes_that_say_less_or_more_than_meant_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        build_config(str(write(tmp_path, "r.yaml", text)))


def test_a_checkpoint_or_binary_file_given_as_recipe(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ConfigError, match=r"last\.pt: this is a checkpoint, not a recipe: did you mean --resume"):
        build_config(str(tmp_path / "last.pt"))
    (tmp_path / "latin1.yaml").write_bytes("model:\n  name: r\xe9snet\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a recipe \(a recipe is a UTF-8 text file of YAML\)"):
        build_config(str(tmp_path / "latin1.yaml"))


def test_a_recipe_name_without_yaml_is_found_in_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path, "tiny.yaml", "model:\n  name: resnet10t\n")
    monkeypatch.chdir(tmp_path)
    assert build_config("tiny").model.name == "resnet10t"
