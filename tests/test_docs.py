"""The README stays true: its key table is the schema's, its recipes exist, CI runs its test command."""

import re

from powergrad_train.config import BUNDLED_RECIPES, KEYS, describe_keys_markdown
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_key_table_is_generated_from_the_schema():
    table = README.split("<!-- config-keys:start -->\n")[1].split("<!-- config-keys:end -->")[0]
    assert table.strip() == describe_keys_markdown().strip(), "run: python scripts/config_docs.py --write"


def test_the_key_table_renders_one_row_per_key_with_five_cells():
    """Markdown ends a cell at every | not escaped as \\|: split the rows as a renderer does."""
    table = README.split("<!-- config-keys:start -->\n")[1].split("<!-- config-keys:end -->")[0]
    rows = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in table.strip().splitlines()[2:]]
    assert [len(cells) for cells in rows] == [5] * len(KEYS)
    for cells, key in zip(rows, KEYS.values()):
        assert cells[0].strip() == f"`{key.dotted}`"
        assert cells[4].strip().endswith("*(fixed on resume)*") == key.meta["fixed"], key.dotted


def test_every_recipe_the_readme_names_is_bundled():
    named = set(re.findall(r"`([a-z0-9_]+\.yaml)`", README)) - {"config.yaml"}  # the run folder's file
    assert named and named <= {p.name for p in BUNDLED_RECIPES.glob("*.yaml")}


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests[^\n]*:\n\n```bash\n(.*?)\n```", README, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
