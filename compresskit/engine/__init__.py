"""The machinery of a run: loading and checking a pipeline, the stage cache and its
hashes, the run folder's lock and files, the stage context, torchrun."""
