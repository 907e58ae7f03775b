"""Text students: offline corpora, held-out text from another source, batches grouped by
length, MiniLMv2 relation terms and a retrieval verdict (issue 19), on a tiny random BERT."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError
from compresskit.ops import kd
from compresskit.train.padding import LengthGroupedBatches, Padding
from tests.stages.test_byo import INPUTS, tiny_bert


def test_the_offline_corpora_are_large_and_apart() -> None:
    from compresskit.data import corpora
    from compresskit.data.sources import sentences

    docs = corpora.python_docs()
    train = {s for d in docs for s in sentences(d)}
    assert len(train) > 5000  # 15,600 sentences on CPython 3.11
    other = corpora.package_descriptions()
    assert len(other) > 50 and all(corpora.prose(s) for s in other)
    assert not corpora.prose("See https://example.org for `code` and more words here.")
    assert corpora.prose("This library makes it easy to read and write files on disk.")


def test_padding_is_cut_to_the_longest_sample_and_lengths_are_grouped() -> None:
    specs = [SimpleNamespace(name=i["name"], dynamic=i["dynamic"]) for i in INPUTS]
    padding = Padding.of(specs)
    assert padding is not None and padding.sequence == [0, 1]
    ids = torch.arange(24).reshape(3, 8)
    mask = torch.tensor([[1] * 3 + [0] * 5, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
    cut = padding.trim((ids, mask))
    assert cut[0].shape == (3, 5) and torch.equal(cut[1], mask[:, :5])
    assert Padding.of([SimpleNamespace(name="x", dynamic={})]) is None

    lengths = torch.randint(1, 64, (1000,)).numpy()
    gen = torch.Generator().manual_seed(0)
    batches = list(LengthGroupedBatches(lengths, 16, gen))
    assert len(batches) == len(LengthGroupedBatches(lengths, 16, gen)) == 63
    assert sorted(i for b in batches for i in b) == list(range(1000))
    # Grouped: the padding a batch carries is a fraction of what random batches carry.
    def waste(bs: list[list[int]]) -> int:
        return sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in bs)
    shuffled = torch.randperm(1000, generator=gen).tolist()
    assert waste(batches) < 0.2 * waste([shuffled[i:i + 16] for i in range(0, 1000, 16)])


def test_relation_loss_matches_relations_not_widths() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    assert kd.relation_loss(x, x, heads=4).item() == pytest.approx(0.0, abs=1e-6)
    wide = torch.randn(2, 6, 16)
    assert kd.relation_loss(x, wide, heads=4).item() > 0.01  # widths 8 and 16 compare
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    noisy = x.clone()
    noisy[0, 4:] = 100 * torch.randn(2, 8)  # padded tokens: nothing to match
    assert kd.relation_loss(noisy, x, 4, mask).item() == pytest.approx(
        kd.relation_loss(x, x, 4, mask).item(), abs=1e-6)
    student = x.clone().requires_grad_()
    kd.relation_loss(student, wide, 4, mask).backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 4:].abs().max() == 0


def _pipeline(folder: Path) -> dict:
    inputs = [dict(i, shape=[32]) for i in INPUTS]
    return {
        "name": "text", "task": "embed",
        "data": {"source": "text", "group_by_length": True, "batch_size": 16,
                 "kwargs": {"python": "compresskit.data.corpora:pydoc_topics",
                            "tokenizer": f"hf:{folder}", "max_length": 32, "limit": 320,
                            "held_out": {"ood": "compresskit.data.corpora:package_descriptions"},
                            "held_out_limit": 40}},
        "input": inputs,
        "teacher": {"source": f"hf:{folder}",
                    "output": {"key": "last_hidden_state", "pool": "mean"}},
        "student": {"from_teacher": {"layers": [1]}},
        "stages": [{"type": "distill", "epochs": 2, "lr": 0.001, "losses": [
                       {"type": "cosine"},
                       *[{"type": "relations", "heads": 4,
                          "student": f"model.encoder.layer.0.attention.self.{p}",
                          "teacher": f"model.encoder.layer.1.attention.self.{p}"}
                         for p in ("query", "key", "value")]]},
                   {"type": "export", "parity_samples": 16},
                   {"type": "ptq", "dynamic": True},
                   {"type": "benchmark", "lengths": [32], "runs": 10, "warmup": 1,
                    "memory": False, "verdict_metric": "nn_agreement", "verdict_on": "ood"}],
    }


def test_held_out_text_is_measured_and_judged_on(tmp_path: Path) -> None:
    cfg = _pipeline(tiny_bert(tmp_path / "bert"))
    report = api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    distill = report["stages"][0]["metrics"]
    assert distill["cosine"] > distill["initial"]["cosine"] - 0.05
    rows = report["benchmarks"]
    assert all(set(r["held_out"]) == {"ood"} for r in rows)
    teacher = next(r for r in rows if r["model"] == "teacher" and r["precision"] == "fp32")
    assert teacher["held_out"]["ood"]["nn_agreement"] == pytest.approx(1.0)
    student = next(r for r in rows if r["model"] == "student" and r["precision"] == "fp32")
    assert 0 <= student["held_out"]["ood"]["nn_agreement"] <= 1
    bench = report["stages"][-1]["metrics"]
    assert bench["held_out"] == {"ood": 40}
    assert bench["verdict_metric"] == "nn_agreement" and bench["verdict_on"] == "ood"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "NN agreement (ood)" in md and "NN agreement on ood" in md
    # None of the held-out sentences is in the training text.
    from compresskit.data import sources
    data = sources.text(tokenizer=f"hf:{tmp_path / 'bert'}", python=cfg["data"]["kwargs"]
                        ["python"], limit=320, held_out=cfg["data"]["kwargs"]["held_out"],
                        held_out_limit=40)
    assert not set(data["texts:ood"]) & set(data["texts"]) and len(data["texts:ood"]) == 40


def test_retrieval_verdict_settings_are_checked(tmp_path: Path) -> None:
    cfg = _pipeline(tmp_path)
    cfg["stages"][-1].update(verdict_on="wiki")
    cfg["task"] = "classify"
    with pytest.raises(ConfigError) as e:
        api.validate(cfg)
    text = str(e.value)
    assert "task classify measures accuracy, not nn_agreement" in text
    assert "no held-out set 'wiki'; its held_out names 'ood'" in text
