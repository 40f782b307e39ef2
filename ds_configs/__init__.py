"""DeepSpeed config presets (JSON), installed as package data: see README.md in this folder."""
