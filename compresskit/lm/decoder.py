"""A plain onnxruntime loop over a KV-cache decoder: what an app runs, and what every LM figure
here is measured with. Nothing of onnxruntime-genai is needed to run the file.

The file's contract (onnxruntime-genai's and Optimum's names): inputs `input_ids` [b, s],
`attention_mask` [b, past + s], `past_key_values.{i}.key` / `.value` [b, kv heads, past,
head size] and, when the graph has it, `position_ids` [b, s]; outputs `logits` [b, s, vocab]
and `present.{i}.key` / `.value`. onnxruntime-genai's CPU decoders compute positions from the
attention mask inside GroupQueryAttention and have no `position_ids` input.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

KEY, VALUE = "past_key_values.{}.key", "past_key_values.{}.value"


class Decoder:
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.inputs = set(inputs)
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.")
                          and n.endswith(".key"))
        if "input_ids" not in inputs or "logits" not in {o.name for o in
                                                          self.session.get_outputs()}:
            raise ValueError(f"{path} is not a KV-cache decoder: it needs an input "
                             "'input_ids' and an output 'logits'")
        shape = inputs[KEY.format(0)].shape if self.layers else [1, 1, 0, 1]
        self.kv_heads = shape[1] if isinstance(shape[1], int) else None
        self.head_size = shape[3] if isinstance(shape[3], int) else None
        config = self.path.parent / "genai_config.json"
        if config.exists() and (self.kv_heads is None or self.head_size is None):
            decoder = json.loads(config.read_text())["model"]["decoder"]
            self.kv_heads = self.kv_heads or int(decoder["num_key_value_heads"])
            self.head_size = self.head_size or int(decoder["head_size"])
        half = self.layers and "float16" in inputs[KEY.format(0)].type
        self.dtype = np.float16 if half else np.float32

    def empty(self, batch: int = 1) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads or 1, 0, self.head_size or 1), dtype=self.dtype)
        return [z] * (2 * self.layers)

    def __call__(self, ids: np.ndarray, past: list[np.ndarray] | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of `ids` [b, s] after `past` (the presents of earlier calls), and the new
        presents."""
        b, s = ids.shape
        past = self.empty(b) if past is None else past
        done = past[0].shape[2] if past else 0
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((b, done + s), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.tile(np.arange(done, done + s, dtype=np.int64), (b, 1))
        for i in range(self.layers):
            feeds[KEY.format(i)], feeds[VALUE.format(i)] = past[2 * i], past[2 * i + 1]
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        logits = out[names.index("logits")]
        presents = []
        for i in range(self.layers):
            presents += [out[names.index(f"present.{i}.key")],
                         out[names.index(f"present.{i}.value")]]
        return logits, presents

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        logits, past = self(np.asarray([prompt]))
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits, past = self(np.asarray([[token]]), past)
        return out

    def timed(self, prompt: list[int], new_tokens: int) -> dict[str, float]:
        """Time to first token (prefill of the prompt, its first token chosen) and decode
        tokens per second over `new_tokens` more greedy steps."""
        start = time.perf_counter()
        logits, past = self(np.asarray([prompt]))
        token = int(logits[0, -1].argmax())
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = self(np.asarray([[token]]), past)
            token = int(logits[0, -1].argmax())
        decode = time.perf_counter() - start
        return {"ttft_ms": first * 1e3, "decode_tokens_per_s": new_tokens / decode}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score(decoder: Decoder, blocks: np.ndarray, reference: np.ndarray | None = None
          ) -> tuple[float, float | None, np.ndarray]:
    """Perplexity over `blocks` [n, t] (each position predicting the next token), the share of
    positions whose top-1 equals `reference`'s (the teacher's argmax), and this file's argmax."""
    nll, count, same = 0.0, 0, 0
    tops = np.zeros((blocks.shape[0], blocks.shape[1] - 1), dtype=np.int64)
    for i, block in enumerate(blocks):
        logits, _ = decoder(block[None, :])
        lp = log_softmax(logits[0, :-1])
        nll -= float(lp[np.arange(len(block) - 1), block[1:]].sum())
        count += len(block) - 1
        tops[i] = lp.argmax(-1)
        if reference is not None:
            same += int((tops[i] == reference[i]).sum())
    return math.exp(nll / count), (same / count if reference is not None else None), tops


def folder_bytes(path: Path) -> int:
    """The bytes of a decoder: its graph and external weights."""
    folder = Path(path).parent
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.name.startswith(Path(path).name) or f.suffix == ".data"))


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """The body of `python compresskit/lm/decoder.py`: timings in a fresh process, and its
    peak RSS (onnxruntime and the decoder)."""
    dec = Decoder(Path(args["path"]), args.get("threads"))
    dec.greedy(args["prompt"][:16], 4)  # warm-up: first-run allocations
    runs = [dec.timed(args["prompt"], args["new_tokens"]) for _ in range(args.get("repeat", 3))]
    out = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    out["peak_rss_mb"] = _peak_kb() / 1024
    return out


def _peak_kb() -> float:
    """The process's peak resident memory: Linux's VmHWM, which starts afresh at exec (ru_maxrss
    keeps the forking parent's, so a child of a large process reports the parent's size)."""
    import resource

    from compresskit.backends.device_runner import status_kb

    peak = status_kb("VmHWM")
    if peak is not None:
        return float(peak)
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    import sys

    print(json.dumps(run_child(json.loads(sys.stdin.read()))))
