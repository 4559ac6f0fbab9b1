"""The config key table (Markdown) in docs/config.md, generated from the schema.

    python scripts/config_docs.py            # print it
    python scripts/config_docs.py --write    # replace the table in docs/config.md
tests/test_docs.py checks that docs/config.md holds exactly this table.
"""

import sys
from pathlib import Path

from powergrad_train.config.schema import describe_keys_markdown

START, END = "<!-- config-keys:start -->\n", "<!-- config-keys:end -->"

if __name__ == "__main__":
    table = describe_keys_markdown()
    if "--write" in sys.argv[1:]:
        page = Path(__file__).resolve().parent.parent / "docs" / "config.md"
        text = page.read_text()
        head, rest = text.split(START)
        page.write_text(head + START + table + "\n" + END + rest.split(END)[1])
    else:
        print(table)
