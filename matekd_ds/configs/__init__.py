"""Built-in run configs (YAML); `offline_default.yaml` is what `matekd train` runs with no --config."""
