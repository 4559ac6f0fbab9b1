"""The config: the schema assembled from each part's declared keys, recipes (YAML) and --set."""
