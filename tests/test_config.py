"""The schema: recipes, overrides, validation and the errors a user sees."""

import re
from pathlib import Path

import pytest

from powergrad_train.config.build import build_config, check_runtime, parse_override, read_value
from powergrad_train.config.recipes import BUNDLED_RECIPES, read_yaml_text
from powergrad_train.config.schema import KEYS, Key, describe_keys, to_dict
from powergrad_train.system.errors import ConfigError
from powergrad_train.training.run import seed_everything


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
        build_config(str(write(tmp_path, "r.yaml", "amp: on\n")))
    with pytest.raises(ConfigError, match="amp = 'on' is not allowed"):  # the command line reads text as text
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


# ----------------------------------------------------------------------------- values read as they look

FLOAT_KEYS = [k for k in KEYS.values() if k.type is float]
INT_KEYS = [k for k in KEYS.values() if k.type is int]


def recipe_setting(tmp_path: Path, dotted: str, text: str) -> str:
    """A recipe that sets one key to the YAML text `text`."""
    *section, name = dotted.split(".")
    body = f"{section[0]}:\n  {name}: {text}\n" if section else f"{name}: {text}\n"
    return str(write(tmp_path, "r.yaml", body))


@pytest.mark.parametrize("key", FLOAT_KEYS, ids=lambda k: k.dotted)
def test_every_float_key_refuses_nan_and_inf(key, tmp_path):
    for text in (".nan", "nan", "NaN", ".inf", "inf", "-.inf", "-inf", "+.inf", "Infinity", "1e400"):
        with pytest.raises(ConfigError, match=rf"--set {key.dotted}={re.escape(text)}: {key.dotted} = \S+ must be a "
                                              "finite number"):
            build_config(None, [f"{key.dotted}={text}"])
        if text.startswith((".", "-.", "+.")) or text == "1e400":  # the spellings YAML reads as floats
            with pytest.raises(ConfigError, match=rf"r\.yaml: {key.dotted} = \S+ must be a finite number"):
                build_config(recipe_setting(tmp_path, key.dotted, text))


@pytest.mark.parametrize("key", INT_KEYS + FLOAT_KEYS, ids=lambda k: k.dotted)
def test_every_number_key_reads_numbers_as_they_look(key, tmp_path):
    """Leading zeros are decimal (never octal); hex, octal, binary, sexagesimal and 1_000 are refused
    as numbers, on the command line and in a recipe alike (YAML 1.1 read 010 as 8 and 1:30 as 90)."""
    kind = "a whole number" if key.type is int else "a number"
    assert parse_override(f"{key.dotted}=010")[1] == 10 and read_yaml_text("v: 010")["v"] == 10
    assert parse_override(f"{key.dotted}=+007")[1] == 7 and read_yaml_text("v: +007")["v"] == 7
    for text in ("0x10", "0o17", "0b11", "1:30", "1_000", "2024-01-01"):
        with pytest.raises(ConfigError, match=rf"{key.dotted} = '{text}' must be {kind}"):
            build_config(None, [f"{key.dotted}={text}"])
        with pytest.raises(ConfigError, match=rf"r\.yaml: {key.dotted} = '{text}' must be {kind}"):
            build_config(recipe_setting(tmp_path, key.dotted, text))
    if key.type is float:
        for text, value in (("1e-3", 1e-3), (".5", 0.5), ("5.", 5.0), ("-2.5E+2", -250.0), ("3", 3.0)):
            assert parse_override(f"{key.dotted}={text}")[1] == value
            assert read_yaml_text(f"v: {text}")["v"] == value


def test_a_command_line_value_is_its_text():
    """# is part of a value (no comments on the command line), a number-looking value of a string key
    stays text, and surrounding quotes are dropped; null, true and false keep their meaning."""
    assert parse_override("model.name=res#net")[1] == "res#net"
    assert build_config(None, ["data.root=/p #2"]).data.root == "/p #2"
    assert parse_override("model.name=yes")[1] == "yes"
    assert parse_override("model.name='resnet18'")[1] == "resnet18"
    assert parse_override("loss.pgt_alpha=null")[1] is None
    assert parse_override("data.val_batch_size=~")[1] is None
    assert parse_override("channels_last=true")[1] is True and parse_override("model.compile=False")[1] is False
    assert build_config(None, ["seed=0123"]).seed == 123


@pytest.mark.parametrize("item,text,value", [
    (str, "[console, csv]", ["console", "csv"]), (str, "[]", []), (str, "console", ["console"]),
    (int, "[1, 010, 3]", [1, 10, 3]), (str, "null", None),
])
def test_a_list_key_takes_a_flow_list(item, text, value):
    key = Key("log.outputs", list, True, None, dict(KEYS["model.name"].meta, path=False), element=item)
    assert read_value(key, text) == value


def test_seed_range_is_numpy_s():
    assert build_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    seed_everything(2**32 - 1)  # the largest seed numpy takes
    with pytest.raises(ConfigError, match=r"seed = 4294967296 is out of range: must be in \[0, 4294967296\)"):
        build_config(None, ["seed=4294967296"])


# ----------------------------------------------------------------------------- recipes: where, and how big

def test_base_is_relative_to_the_recipe_then_bundled_never_the_current_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    child = write(folder, "child.yaml", "base: smoke.yaml\noptim: {lr: 0.2}\n")
    write(tmp_path, "smoke.yaml", "model: {name: from_the_current_folder}\n")
    monkeypatch.chdir(tmp_path)
    assert build_config(str(child)).model.name == "resnet10t"  # the bundled smoke.yaml, as docs/config.md says
    assert build_config("smoke.yaml").model.name == "from_the_current_folder"  # --config: the current folder first
    write(folder, "smoke.yaml", "model: {name: beside_the_recipe}\n")
    assert build_config(str(child)).model.name == "beside_the_recipe"
    with pytest.raises(ConfigError, match=r"child\.yaml: base: recipe not found: 'nope\.yaml'"):
        build_config(str(write(folder, "child.yaml", "base: nope.yaml\n")))


def test_recipe_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "base.yaml", "model: {name: resnet18}\n")
    child = write(tmp_path, "child.yaml", "base: ~/base.yaml\n")
    assert build_config("~/child.yaml").model.name == "resnet18"
    assert build_config(str(child)).model.name == "resnet18"


def bomb(levels: int) -> str:
    lines = ["model:", "  name:", '    - &a ["xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx",'
                                  '"xxxxxxxx","xxxxxxxx","xxxxxxxx"]']
    for prev, name in zip("abcdefgh", "bcdefghi"[:levels - 1]):
        lines.append(f"    - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,message", [
    (bomb(8), r"r\.yaml: its YAML aliases expand it to more than 10000 values"),  # 391 bytes, 4.3e7 strings
    (bomb(5), r"r\.yaml: its YAML aliases expand it to more than 10000 values"),
    ("model:\n  name: &a [x, *a]\n", r"r\.yaml: its YAML aliases expand it"),  # a list inside itself
    ("? [a, b]\n: 1\n", r"r\.yaml:1: a list is used as a key \(a key is a name, such as lr\)"),
    ("optim:\n  ? {lr: 1}\n  : 2\n", r"r\.yaml:2: a mapping is used as a key"),
    ("- " * 1000 + "x", r"r\.yaml: nested too deeply for a recipe"),
    ("[" * 30000, r"r\.yaml: more than 256 '\[' and '\{'"),
], ids=["8-level alias bomb", "5-level alias bomb", "recursive alias", "list key", "mapping key", "deep nesting",
        "deeper nesting"])
def test_hostile_recipes_are_one_short_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_config(str(write(tmp_path, "r.yaml", text)))
    assert len(str(e.value)) < 300 and "\n" not in str(e.value)


def test_a_recipe_beyond_64_kib_is_refused_unread(tmp_path):
    path = write(tmp_path, "r.yaml", "# " + "x" * (64 << 10) + "\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: \d+ bytes is too large for a recipe"):
        build_config(str(path))


HUGE = "y" * 50_000  # within the 64 KiB a recipe may hold


@pytest.mark.parametrize("text,overrides", ids=range(9), argvalues=[
    (f"model: {{name: [{HUGE}]}}\n", []),  # wrong type
    (f"amp: {HUGE}\n", []),  # not a choice
    (f"model: {HUGE}\n", []),  # a section given a value
    (f"base: [{HUGE}]\n", []),  # base not a name
    (f"base: {HUGE}.yaml\n", []),  # base not found
    (f"model: {{{'k' * 1000}: 1}}\n", []),  # unknown key
    (None, [f"{'k' * 100_000}=1"]),  # unknown key on the command line
    (None, [f"optim.lr={HUGE}"]),  # wrong type on the command line
    (None, [f"schedule.name={HUGE}"]),
])
def test_an_error_line_quotes_at_most_80_characters_of_a_value(tmp_path, text, overrides):
    recipe = str(write(tmp_path, "r.yaml", text)) if text else None
    with pytest.raises(ConfigError) as e:
        build_config(recipe, overrides)
    message = str(e.value)
    assert "y" * 81 not in message and "k" * 81 not in message and "..." in message, message[:500]


def test_values_from_a_recipe_are_quoted_on_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config(str(write(tmp_path, "r.yaml", 'model: {name: ["a\\nb\\u001b[31m"]}\n')))
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and r"a\nb\x1b[31m" in str(e.value)


def test_a_number_for_a_string_key_says_to_quote_it(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"data\.root = 2024 must be a string: YAML reads 2024 as a number; put it "
                                          r"in quotes"):
        build_config(recipe_setting(tmp_path, "data.root", "2024"))
    monkeypatch.chdir(tmp_path)
    assert build_config(None, ["data.root=2024"]).data.root == str(tmp_path / "2024")  # a folder named 2024
    assert build_config(recipe_setting(tmp_path, "data.root", "'2024'")).data.root == str(tmp_path / "2024")


# ----------------------------------------------------------------------------- paths

@pytest.mark.parametrize("text,expected", [
    ("data", "{cwd}/data"), ("./a/../b", "{cwd}/a/../b"), ("~/imagenet", "{home}/imagenet"), ("~", "{home}"),
    ("/abs/path", "/abs/path"), ("builtin:demo", "builtin:demo"),
])
def test_data_root_is_stored_absolute(tmp_path, monkeypatch, text, expected):
    """config.yaml and the checkpoint then mean the same folder from wherever validate or a resume runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = expected.format(cwd=tmp_path, home=tmp_path / "home")
    assert build_config(None, [f"data.root={text}"]).data.root == want
    assert build_config(recipe_setting(tmp_path, "data.root", f"'{text}'")).data.root == want


@pytest.mark.parametrize("text,message", [
    ("builtin:dmeo", r"'builtin:dmeo' is not a built-in data set \(the one there is: builtin:demo\)"),
    ('"a\\0b"', r"is not a path \(it holds a NUL character\)"),
    ('""', r"data\.root = '' is not a path"),
])
def test_data_root_that_is_no_path(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        build_config(recipe_setting(tmp_path, "data.root", text))


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("wrong,right", [
    ("model.nmae", "model.name"), ("lr", "optim.lr"), ("optimizer.lr", "optim.lr"), ("Optim.LR", "optim.lr"),
    ("epochs", "schedule.epochs"), ("optim.epochs", "schedule.epochs"), ("label_smooting", "loss.label_smoothing"),
    ("name", "model.name or optim.name or schedule.name or loss.name or batch_transform.name or weight_average.name"), ("data.batchsize", "data.batch_size"),
])
def test_a_wrong_key_gets_the_closest_real_one(wrong, right, tmp_path):
    with pytest.raises(ConfigError, match=rf"unknown config key '{wrong}' \(did you mean {right}\?\)"):
        build_config(None, [f"{wrong}=1"])


CHOICE_KEYS = [k for k in KEYS.values() if k.meta["choices"]]


@pytest.mark.parametrize("key", CHOICE_KEYS, ids=lambda k: k.dotted)
def test_a_wrong_choice_gets_the_closest_one(key):
    for choice in key.meta["choices"]:
        for wrong in {choice.upper(), choice.capitalize(), choice[:-1] + "x" + choice[-1]} - {choice}:
            # a list key names the wrong element of the list
            given = rf"\['{wrong}'\] holds '{wrong}', which" if key.type is list else f"'{wrong}'"
            with pytest.raises(ConfigError, match=rf"{key.dotted} = {given} is not allowed: one of .* \(did you "
                                                  rf"mean {choice}\?\)"):
                build_config(None, [f"{key.dotted}={wrong}"])


def test_a_config_error_carries_its_key_and_source(tmp_path):
    """The key and where it was set travel as data, not only in the message."""
    with pytest.raises(ConfigError) as raised:
        build_config(None, ["optim.lr=-1"])
    assert (raised.value.key, raised.value.source) == ("optim.lr", "--set optim.lr=-1")
    path = write(tmp_path, "r.yaml", "optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as raised:
        build_config(str(path))
    assert (raised.value.key, raised.value.source) == ("optim.lrr", str(path))
    import pickle
    again = pickle.loads(pickle.dumps(raised.value))
    assert (str(again), again.key, again.source) == (str(raised.value), "optim.lrr", str(path))


def test_a_renamed_key_is_read_as_its_new_keys_with_one_notice(tmp_path, capsys):
    """ema.decay (before weight averages were parts) in a recipe, a --set or a stored config."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("base: smoke.yaml\nema:\n  decay: 0.99\n")
    for build, where in ((lambda: build_config(str(recipe)), f"{recipe}"),
                         (lambda: build_config(None, ["ema.decay=0.99"]), "--set ema.decay=0.99")):
        cfg = build()
        assert (cfg.weight_average.name, cfg.weight_average.decay) == ("ema", 0.99)
        assert capsys.readouterr().err.splitlines() == [
            f"notice: {where}: ema.decay is now weight_average.name: ema with weight_average.decay; read as "
            "weight_average.name = ema, weight_average.decay = 0.99"]
    stored = to_dict(build_config(None, []))
    del stored["weight_average"]
    stored["ema"] = {"decay": None}  # what every earlier checkpoint holds: no average, as now
    assert build_config(None, start=("old/config.yaml", stored), lenient=True).weight_average.name == "none"
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match=r"--set ema.decay=2: weight_average.decay = 2.0 is out of range"):
        build_config(None, ["ema.decay=2"])
