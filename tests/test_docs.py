"""The README and the documentation site (docs/, mkdocs.yml) stay true: the key table is the schema's,
the recipes they name are bundled, every command they show parses, their links reach what they name,
CI runs the README's two commands, and every page is in the site's navigation."""

import re
import shlex

import pytest
import yaml

from powergrad_train import cli
from powergrad_train.cli import COMMANDS, main
from powergrad_train.config.build import build_config
from powergrad_train.config.recipes import BUNDLED_RECIPES
from powergrad_train.config.schema import KEYS, describe_keys_markdown
from powergrad_train.system.errors import ConfigError
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
PAGES = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
TEXTS = {"README.md": README, **{f"docs/{name}": text for name, text in PAGES.items()}}
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.S | re.M)
# Links that leave the repository: the paper and the PGT authors' code, nothing else.
EXTERNAL = {"https://arxiv.org/abs/2111.12495", "https://github.com/bishshoy/power-grad-transform"}


def key_table() -> str:
    page = PAGES["config.md"]
    assert page.count("<!-- config-keys:start -->\n") == 1 and page.count("<!-- config-keys:end -->") == 1
    return page.split("<!-- config-keys:start -->\n")[1].split("<!-- config-keys:end -->")[0]


def test_the_key_table_is_generated_from_the_schema():
    assert key_table().strip() == describe_keys_markdown().strip(), "run: python scripts/config_docs.py --write"


def test_the_key_table_renders_one_row_per_key_with_five_cells():
    """Markdown ends a cell at every | not escaped as \\|: split the rows as a renderer does."""
    rows = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in key_table().strip().splitlines()[2:]]
    assert [len(cells) for cells in rows] == [5] * len(KEYS)
    for cells, key in zip(rows, KEYS.values()):
        assert cells[0].strip() == f"`{key.dotted}`"
        assert cells[4].strip().endswith("*(fixed on resume)*") == key.meta["fixed"], key.dotted


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(where, subcommand, arguments) of every powergrad-train command the README and the pages show:
    in bash blocks and in inline code, run as `powergrad-train`, `-m powergrad_train` (python, torchrun)
    or through scripts/slurm_train.sh, which passes its arguments on."""
    found = []
    for where, text in TEXTS.items():
        blocks = [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh")]
        prose = FENCE.sub("", text)
        lines = [line for body in blocks for line in body.replace("\\\n", " ").splitlines()]
        lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
        for line in lines:
            if not re.search(r"powergrad-train|powergrad_train|slurm_train\.sh", line):
                continue
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                rest = tokens[i + 1:]
                starts = (token == "powergrad-train" and rest and (rest[0] in COMMANDS or rest[0].startswith("-"))
                          or token == "powergrad_train" and tokens[i - 1] == "-m"
                          or token.endswith("slurm_train.sh"))
                if starts:
                    end = next((j for j, t in enumerate(rest) if t in ("&&", "||", ";", "|")), len(rest))
                    args = rest[:end]
                    sub = args.pop(0) if args and args[0] in COMMANDS else "train"
                    found.append((where, sub, args))
    return found


SHOWN = shown_commands()


def option_value(args: list[str], option: str):
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith(option + "="):
            yield arg.split("=", 1)[1]


def help_text(sub: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(([] if sub == "train" else [sub]) + ["--help"])
    assert stop.value.code == 0, sub
    return capsys.readouterr().out


def test_every_subcommand_is_shown_and_every_option_shown_is_one_it_takes(capsys):
    """`powergrad-train SUB --help` answers for each subcommand shown, and lists every option a shown
    command gives it (a renamed or misspelled option in the docs fails here)."""
    assert {sub for _, sub, _ in SHOWN} == set(COMMANDS)
    options = {sub: set(re.findall(r"--[a-z][a-z0-9-]*", help_text(sub, capsys))) | {"--help"} for sub in COMMANDS}
    wrong = [(where, sub, arg) for where, sub, args in SHOWN for token in args
             for arg in re.findall(r"^\[?(--[a-z][a-z0-9-]*)", token) if arg not in options[sub]]
    assert not wrong


def test_every_complete_command_shown_parses():
    """A command shown with arguments and no placeholders (RECIPE, PATH, [--option]) is one its
    subcommand's parser takes: no unknown option or argument, none missing."""
    parsers = {"train": cli._train_parser, "validate": cli._validate_parser, "bench": cli._bench_parser,
               "env": cli._env_parser}
    refused = []
    for where, sub, args in SHOWN:
        if sub in parsers and args and "--help" not in args and not any(a.isupper() or a[0] == "[" for a in args):
            try:
                parsers[sub]().parse_args(args)
            except ConfigError as e:
                refused.append((where, sub, args, str(e)))
    assert not refused


RECIPE_COMMANDS = sorted({(recipe, tuple(option_value(args, "--set")))
                          for _, sub, args in SHOWN if sub in ("train", "bench")
                          for recipe in option_value(args, "--config") if recipe.endswith(".yaml")})


def test_every_recipe_shown_builds_with_the_overrides_shown():
    assert {"smoke.yaml", "resnet50_pgt.yaml"} <= {recipe for recipe, _ in RECIPE_COMMANDS}
    for recipe, overrides in RECIPE_COMMANDS:
        build_config(recipe, list(overrides))


# A dry run reads the tests' tiny set, in float32 (the paper recipes' fp16 needs a GPU), at a batch
# the tiny set holds; the overrides shown for these keys are checked above.
TINY = {"data.root": None, "amp": "off", "data.batch_size": "16", "data.workers": "1"}
DRY_RUNS = sorted({(recipe, tuple(o for o in overrides if o.split("=")[0] not in TINY))
                   for recipe, overrides in RECIPE_COMMANDS})


@pytest.mark.parametrize("recipe,overrides", DRY_RUNS, ids=[" ".join(c[:1] + c[1]) for c in DRY_RUNS])
def test_every_recipe_shown_dry_runs_with_its_overrides(recipe, overrides, tiny_root, tmp_path, monkeypatch, capsys):
    """--dry-run makes every check a real start makes, and writes no run folder."""
    monkeypatch.chdir(tmp_path)
    tiny = [f"{key}={tiny_root if value is None else value}" for key, value in TINY.items()]
    main(["--config", recipe, "--output", str(tmp_path / "run"), "--dry-run",
          *[a for value in (*overrides, *tiny) for a in ("--set", value)]])
    assert "LR at the first step of each epoch" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


REPRODUCE_COMMANDS = sorted({tuple(a for a in args if a != "--dry-run") for _, sub, args in SHOWN
                             if sub == "reproduce" and "--data" in args and not any(a.isupper() for a in args)})


def test_every_reproduce_command_shown_plans_with_dry_run(tmp_path, monkeypatch, capsys):
    """The plan needs no data folder and writes nothing."""
    assert REPRODUCE_COMMANDS
    monkeypatch.chdir(tmp_path)
    for args in REPRODUCE_COMMANDS:
        main(["reproduce", *args, "--dry-run"])
        assert "GPU hours" in capsys.readouterr().out, args
    assert not any(tmp_path.iterdir())


def test_every_recipe_named_is_bundled():
    named = {name for text in TEXTS.values() for name in re.findall(r"`([a-z0-9_]+\.yaml)`", text)}
    named |= {recipe for recipe, _ in RECIPE_COMMANDS}
    named -= {"config.yaml"}  # the run folder's file
    assert named and named <= {p.name for p in BUNDLED_RECIPES.glob("*.yaml")}


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M)}


def test_links_reach_their_file_and_heading_and_leave_the_repository_only_for_the_paper():
    broken = []
    for where, text in TEXTS.items():
        prose = re.sub(r"`[^`]*`", "", FENCE.sub("", text))
        for target in re.findall(r"\]\(([^)\s]+)\)|<(https?://[^>]+)>", prose):
            target = "".join(target)
            if target.startswith(("http:", "https:")):
                broken += [] if target in EXTERNAL else [(where, target)]
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / where).parent / path if path else REPO / where
            if not (file.resolve().is_relative_to(REPO) and file.exists()) or anchor and anchor not in anchors(file.read_text()):
                broken.append((where, target))
    assert not broken


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    items = nav.values() if isinstance(nav, dict) else nav
    return [page for item in items for page in nav_pages(item)]


def test_every_docs_page_is_in_the_sites_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and sorted(nav_pages(config["nav"])) == sorted(PAGES)


def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


def readme_block(after: str) -> str:
    """The fenced bash block that follows the paragraph starting with `after`."""
    return re.search("\n" + after + r"[^`]*?\n\n```bash\n(.*?)\n```", README, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    """Both commands a newcomer needs are in the README's first screen, and CI runs them as written,
    the set-up and demo first, then the tests."""
    setup, tests = readme_block("On a fresh Linux"), readme_block("Run the tests")
    first_screen = "\n".join(README.splitlines()[:40])
    assert f"```bash\n{setup}\n```" in first_screen and f"```bash\n{tests}\n```" in first_screen
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert setup in ci_lines and tests in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(tests)
