"""DDP through polyfm's Trainer, on two CPU processes (gloo): the same code path as
multi-GPU runs, minus NCCL. A script, because Lightning's DDP launcher starts the other
rank by running the same command again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_toy_script.py")


def test_ddp_shards_data_syncs_weights_and_metrics_and_checkpoints_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 128 rows, batch 16, two ranks: 4 steps per epoch each, 2 epochs
    assert [r["global_step"] for r in ranks] == [8, 8]
    first, second = (set(r["rows_seen"]) for r in ranks)
    assert len(first) == len(second) == 64 and not first & second, "each rank must see its own half of the training set"
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"], "val/loss is logged with sync_dist: one value on every rank"
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"] and ranks[0]["param_norm"] == ranks[1]["param_norm"]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["epoch=1-step=8.ckpt", "last.ckpt"], checkpoints  # written once (rank 0), no temp files left
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    params = torch.cat([v.flatten() for k, v in state.items() if "running_" not in k and "num_batches" not in k])
    assert abs(float(params.double().sum()) - ranks[0]["param_sum"]) < 1e-6
