"""The data a pipeline trains and measures on: the splits, and the built-in sources."""
