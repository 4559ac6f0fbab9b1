"""The paper's tables: reproduce, report, figures, statistics and the authors' artefacts."""
