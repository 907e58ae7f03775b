"""The teacher's top-k next-token distribution for every training position, computed once.

Per position: the k largest log-probabilities at the stage's temperature (fp16), their token
ids (int32) and the log of the mass left to the rest of the vocabulary (fp16). At k = 256 a
position costs 1.5 KB instead of 4 x 49,152 bytes of logits. The file lives in
<run>/cache/lm_topk/ with a JSON sidecar written last: the key (sha256 of the teacher's weights,
the rows, k and the temperature) and the file's sha256. A stale or corrupt file is rebuilt,
saying which, as the classifier's teacher cache does; prune-free LM pipelines share it across
reruns that change only the student's training.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from compresskit.distill.teacher_cache import weights_digest
from compresskit.engine import distributed as dist
from compresskit.engine.artifacts import atomic_path, sha256_file, write_json
from compresskit.engine.context import StageContext
from compresskit.lm import models as lm_models
from compresskit.lm.losses import TopK, top_k
from compresskit.lm.rows import Rows


def key_of(teacher: nn.Module, data: Rows, k: int, temperature: float) -> str:
    h = hashlib.sha256(weights_digest(teacher).encode())
    h.update(data.ids.contiguous().numpy().tobytes())
    h.update(f"k={k};T={temperature!r}".encode())
    return h.hexdigest()


def teacher_top_k(ctx: StageContext, teacher: nn.Module, data: Rows, k: int,
                  temperature: float, batch: int = 4) -> TopK:
    folder = ctx.run_dir / "cache" / "lm_topk"
    key = key_of(teacher, data, k, temperature)
    path, meta = folder / f"{key[:16]}.pt", folder / f"{key[:16]}.json"
    found = None
    if dist.is_main():
        why = "missing"
        if meta.exists():
            try:
                recorded = json.loads(meta.read_text())
                why = "corrupt (its content does not match its recorded sha256)" \
                    if not path.exists() or sha256_file(path) != recorded.get("sha256") \
                    else ""
            except (OSError, ValueError):
                why = "corrupt (its sidecar .json is unreadable)"
        if not why:
            found = torch.load(path, weights_only=True)
            ctx.log(f"teacher top-{k} read from the cache ({path.name})")
        elif why != "missing":
            ctx.log(f"teacher top-{k} cache {why}: computing it again")
        if found is None:
            found = _compute(ctx, teacher, data, k, temperature, batch)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(found, tmp)
            write_json(meta, {"key": key, "sha256": sha256_file(path), "top_k": k,
                              "temperature": temperature, "rows": len(data)})
    found = dist.broadcast_object(found)
    return TopK(found["logp"], found["ids"], found["log_tail"])


@torch.no_grad()
def _compute(ctx: StageContext, teacher: nn.Module, data: Rows, k: int, temperature: float,
             batch: int) -> dict[str, torch.Tensor]:
    n, t = data.ids.shape
    logp = torch.empty(n, t, k, dtype=torch.float16)
    ids = torch.empty(n, t, k, dtype=torch.int32)
    tail = torch.empty(n, t, dtype=torch.float16)
    for s in range(0, n, batch):
        found = top_k(lm_models.logits(teacher, data.ids[s:s + batch]), k, temperature)
        logp[s:s + batch] = found.logp.half()
        ids[s:s + batch] = found.ids.int()
        tail[s:s + batch] = found.log_tail.half()
        if (s // batch) % 10 == 0:
            ctx.log(f"teacher top-{k}: {min(s + batch, n)}/{n} rows")
    return {"logp": logp, "ids": ids, "log_tail": tail}
