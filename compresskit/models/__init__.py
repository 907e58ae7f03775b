"""Building models: from a `source:` (a Python file, a package, a Hugging Face folder),
with checkpoints, structural edits (pruning, factorising, layer subsets) and their inputs."""
