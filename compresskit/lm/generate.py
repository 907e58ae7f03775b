"""`generate` for task causal-lm: the teacher's completions of a list of prompts, kept as a
dataset for sequence-level distillation.

Each record holds the prompt's and the completion's token ids; the distill stages after it
train on prompt + completion with the loss on the completion's tokens only. Greedy decoding by
default (Kim and Rush's sequence-level KD); with temperature > 0 the draws follow the stage's
seed, so a rerun writes the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from compresskit.config import GenerateConfig
from compresskit.engine.artifacts import sha256_file
from compresskit.engine.context import StageContext, StageResult
from compresskit.errors import StageError
from compresskit.lm import models as lm_models
from compresskit.lm.tokenizers import tokenizer_for

PROMPTS: tuple[str, ...] = (
    "Explain what a Python list comprehension is, with an example.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the difference between a process and a thread?",
    "Give three tips for writing clear documentation.",
    "Describe how a hash table stores and finds a key.",
    "Summarise the water cycle in a few sentences.",
    "Why does the sky look blue during the day?",
    "Write a polite email asking a colleague to review a pull request.",
    "Explain recursion to a ten-year-old.",
    "What are the advantages of unit tests?",
    "Describe a walk through a forest in autumn.",
    "How does a binary search work, and when can it be used?",
    "List the planets of the solar system and one fact about each.",
    "What is an exception in Python, and how is it handled?",
    "Explain the difference between a tuple and a list.",
    "Write a haiku about the sea, then explain its imagery.",
    "How do you make a cup of tea? Give the steps.",
    "What does a compiler do?",
    "Give advice to someone learning to program for the first time.",
    "Explain what a dictionary is in Python and when to use it.",
    "Describe the life cycle of a butterfly.",
    "What is the purpose of version control?",
    "Explain how a for loop differs from a while loop.",
    "Write a short dialogue between a cat and a dog about breakfast.",
    "What makes a good function name?",
    "Explain what an API is, with an everyday comparison.",
    "How does photosynthesis work?",
    "What is a decorator in Python?",
    "Describe the rules of chess in a few sentences.",
    "Why is sleep important for learning?",
    "Explain the idea of a virtual environment in Python.",
    "What is the difference between weather and climate?",
    "Write a limerick about a forgetful robot.",
    "How would you explain the internet to someone from the year 1900?",
    "What is a generator in Python, and why is it useful?",
    "Give a recipe for a simple vegetable soup.",
    "Explain what happens when you type a web address into a browser.",
    "What is the Pythagorean theorem? Give an example.",
    "Describe a busy train station in the morning.",
    "What are the main parts of a computer?",
    "Explain the difference between == and is in Python.",
    "What are some ways to reduce stress at work?",
    "Summarise the plot of a fairy tale you know.",
    "How does a refrigerator keep food cold?",
    "What is object-oriented programming?",
    "Explain why the moon has phases.",
    "Write instructions for planting a tree.",
    "What is a regular expression, and what is it used for?",
    "Describe the sound of rain on a tin roof.",
    "What is the difference between a bug and a feature request?",
    "Explain what a string is in programming.",
    "Why do leaves change colour in autumn?",
    "Give five words that describe a good teacher, and explain one.",
    "What does it mean for a function to be pure?",
    "Explain how vaccines help the body fight disease.",
    "Write a short poem about a city at night.",
    "What is the role of a README file in a project?",
    "How do bees make honey?",
    "Explain the idea of time complexity with an example.",
    "What should a beginner know about reading error messages?",
    "Describe your ideal weekend.",
    "What is a lambda function in Python?",
    "How do airplanes stay in the air?",
    "Explain how to sort a list of numbers by hand.",
)


def prompts(cfg: GenerateConfig, base_dir: Path) -> list[str]:
    """The stage's prompts: a file of one per line, a Python value, or the built-in set."""
    from compresskit.models.sources import SourceError, locate, resolve_attr

    if cfg.prompts is None:
        found = list(PROMPTS)
    elif ":" in cfg.prompts and not Path(cfg.prompts).suffix == ".txt":
        try:
            obj = resolve_attr(cfg.prompts, base_dir)
        except SourceError as e:
            raise ValueError(str(e)) from None
        obj = obj() if callable(obj) else obj
        found = [obj] if isinstance(obj, str) else [str(p) for p in obj]
    else:
        try:
            path = locate(cfg.prompts, base_dir, "prompts file")
        except SourceError as e:
            raise ValueError(str(e)) from None
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    found = [p for p in found if p.strip()]
    return found[:cfg.limit] if cfg.limit else found


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def run(cfg: GenerateConfig, ctx: StageContext) -> StageResult:
    try:
        texts = prompts(cfg, ctx.base_dir)
    except ValueError as e:
        raise StageError(ctx.name, str(e)) from None
    if not texts:
        raise StageError(ctx.name, "no prompts: the prompts file or value is empty")
    model = lm_models.unwrap(ctx.model(cfg.model)).eval()
    tok = tokenizer_for(ctx, cfg.model)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos if eos is not None else 0
    gen = torch.Generator().manual_seed(ctx.seed)
    records: list[dict[str, Any]] = []
    encoded = [encode_prompt(tok, t, cfg.chat_template) for t in texts]
    for start in range(0, len(encoded), cfg.batch_size):
        batch = encoded[start:start + cfg.batch_size]
        width = max(len(b) for b in batch)
        # left padding: every prompt ends where generation starts
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.temperature > 0,
                **({"temperature": cfg.temperature, "top_p": cfg.top_p}
                   if cfg.temperature > 0 else {}),
                pad_token_id=pad, eos_token_id=eos)
        for j, prompt_ids in enumerate(batch):
            new = [int(t) for t in out[j, width:]]
            if eos is not None and eos in new:
                new = new[:new.index(eos) + 1]
            records.append({"prompt": texts[start + j], "prompt_ids": prompt_ids,
                            "completion_ids": new,
                            "completion": tok.decode(new, skip_special_tokens=True)})
        ctx.log(f"{len(records)}/{len(encoded)} prompts")
    path = ctx.work_dir / "generated.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tokens = sum(len(r["completion_ids"]) for r in records)
    return StageResult(
        metrics={"prompts": len(records), "completion_tokens": tokens,
                 "mean_completion_tokens": tokens / len(records), "model": cfg.model,
                 "greedy": cfg.temperature == 0, "example": {
                     "prompt": records[0]["prompt"], "completion": records[0]["completion"]}},
        artifacts=[{"path": f"{ctx.name}/generated.jsonl", "format": "dataset",
                    "precision": None, "model": cfg.model, "bytes": path.stat().st_size,
                    "sha256": sha256_file(path)}])


def read(run_dir: Path, artifacts: list[Any]) -> list[dict[str, Any]]:
    """Every record the generate stages before this one wrote, in order."""
    out: list[dict[str, Any]] = []
    for a in artifacts:
        if a.get("format") == "dataset":
            with (run_dir / a["path"]).open(encoding="utf-8") as f:
                out += [json.loads(line) for line in f if line.strip()]
    return out
