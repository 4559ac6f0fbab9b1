"""Print the config key table (Markdown) that README.md carries, generated from the schema.

    python scripts/config_docs.py
tests/test_docs.py checks that README.md holds exactly this table.
"""

from powergrad_train.config import describe_keys_markdown

if __name__ == "__main__":
    print(describe_keys_markdown())
