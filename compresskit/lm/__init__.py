"""Causal language models (`task: causal-lm`): token-level and sequence-level distillation of a
decoder, its export as a KV-cache ONNX decoder, INT8 and INT4 weights, and the measures LM users
read (perplexity, next-token agreement, time to first token, tokens per second).

The stages `distill`, `export`, `ptq` and `benchmark` hand a causal-lm pipeline to the modules
here; `generate` (sequence-level KD: the teacher writes the completions) is the LM's own stage.
"""
