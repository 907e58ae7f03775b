"""`benchmark` for task causal-lm: every decoder file measured the way LM users measure.

Per file, with the plain onnxruntime loop of compresskit.lm.decoder:
- perplexity on the evaluation split (`test`: text from another source than training) and on
  `val` (held-out blocks of the training text);
- top-1 next-token agreement with the FP32 teacher's file on the same positions;
- time to first token for a `prompt_tokens` prompt, and decode tokens/s over `new_tokens`
  greedy tokens, at 1 thread and at all cores, each in a fresh child process, the files
  interleaved in 3 rounds (medians), with the processes' peak RSS;
- the file's bytes, and a greedy continuation of `sample_prompt` (the same for every file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from compresskit.config import BenchmarkConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.lm import decoder
from compresskit.lm.decoder import Decoder, score
from compresskit.lm.tokenizers import tokenizer_for

ROUNDS = 3
"""Timed rounds per file and thread count, the files interleaved."""


def blocks(ds: Any) -> np.ndarray:
    return np.stack([np.asarray(ds[i][0], dtype=np.int64) for i in range(len(ds))])


def speed(path: str, prompt: list[int], new_tokens: int, threads: int,
          repeat: int = 3) -> dict[str, float]:
    """Timings (median of `repeat`) and peak RSS of one file, in a fresh process."""
    args = {"path": path, "prompt": prompt, "new_tokens": new_tokens, "threads": threads,
            "repeat": repeat}
    # The module's file as a script: the child imports numpy and onnxruntime alone, so its
    # peak RSS is the decoder's, not torch's.
    done = subprocess.run([sys.executable, decoder.__file__],
                          input=json.dumps(args), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"timing {path} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(cfg: BenchmarkConfig, ctx: StageContext) -> StageResult:
    files = sorted((a for a in ctx.artifacts if a.get("format") == "decoder"),
                   key=lambda a: (a.get("model") != "teacher", a.get("precision") != "fp32"))
    if not files:
        raise StageError(ctx.name, "no decoder to measure: an export stage must come first")
    tok = tokenizer_for(ctx, "teacher" if ctx.config.teacher else "student")
    splits = ctx.data()
    test, val = blocks(splits.eval), blocks(splits.val)
    prompt = [int(t) for t in np.concatenate(list(test))[:cfg.prompt_tokens]]
    sample_ids = [int(t) for t in tok(cfg.sample_prompt)["input_ids"]]
    cores = os.cpu_count() or 1
    reference = None
    teacher = next((a for a in files if a.get("model") == "teacher"
                    and a.get("precision") == "fp32"), None)
    rows: list[dict[str, Any]] = []
    for a in files:
        path = ctx.run_dir / a["path"]
        dec = Decoder(path, cores)
        ppl, agree, tops = score(dec, test, reference)
        if a is teacher:
            reference, agree = tops, 1.0
        val_ppl = score(dec, val)[0]
        text = tok.decode(dec.greedy(sample_ids, 32), skip_special_tokens=False)
        row: dict[str, Any] = {
            "artifact": a["path"], "model": a.get("model"), "precision": a.get("precision"),
            "method": a.get("method"), "kind": "lm", "target": "cpu",
            "perplexity": ppl, "val_perplexity": val_ppl, "agreement": agree,
            "bytes": a["bytes"], "sample": text, "prompt_tokens": len(prompt),
            "new_tokens": cfg.new_tokens}
        row["threads_all"] = cores
        ctx.log(f"{a['path']}: perplexity {ppl:.2f}, agreement "
                f"{'-' if agree is None else f'{agree:.3f}'}, {a['bytes'] / 1e6:.1f} MB")
        rows.append(row)
    # Speed: the files interleaved, ROUNDS times, each time in a fresh process, so machine noise
    # falls on all of them alike; the median of the rounds.
    settings = list(dict.fromkeys((1, cores)))
    runs: dict[tuple[int, int], list[dict[str, float]]] = {}
    for _ in range(ROUNDS):
        for i, a in enumerate(files):
            for threads in settings:
                try:
                    found = speed(str(ctx.run_dir / a["path"]), prompt, cfg.new_tokens,
                                  threads, repeat=1)
                except RuntimeError as e:
                    raise StageError(ctx.name, str(e)) from None
                runs.setdefault((i, threads), []).append(found)
    for i, row in enumerate(rows):
        for threads in settings:
            timed = runs[i, threads]
            row[f"threads_{threads}"] = {
                "ttft_ms": float(np.median([t["ttft_ms"] for t in timed])),
                "decode_tokens_per_s": float(np.median([t["decode_tokens_per_s"]
                                                        for t in timed])),
                "peak_rss_mb": max(t["peak_rss_mb"] for t in timed)}
        row["decode_tokens_per_s"] = row["threads_1"]["decode_tokens_per_s"]
        row["ttft_ms"] = row["threads_1"]["ttft_ms"]
        row["peak_rss_mb"] = max(row[f"threads_{t}"]["peak_rss_mb"] for t in settings)
        ctx.log(f"{row['artifact']}: {row['decode_tokens_per_s']:.1f} tokens/s (1 thread), "
                f"TTFT {row['ttft_ms']:.0f} ms, peak RSS {row['peak_rss_mb']:.0f} MB")
    base = rows[0] if rows[0]["model"] == "teacher" and rows[0]["precision"] == "fp32" else None
    if base is not None:
        for r in rows:
            r["speedup_vs_teacher"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            r["bytes_vs_teacher"] = r["bytes"] / base["bytes"]
    return StageResult(metrics={"artifacts": len(rows), "prompt": cfg.sample_prompt,
                                "cores": cores}, benchmarks=rows)
