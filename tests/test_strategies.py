"""FPQuantPrecision under DDP and ModelParallelStrategy (FSDP2), two CPU processes over gloo.

Each case runs tests/scripts/train_distributed.py in a subprocess (Lightning re-launches the
script for the second rank, so it is guarded by ``if __name__ == "__main__":``) and checks the
JSON that rank 0 writes. FSDP1 is covered in test_precision.py (it refuses the plugin).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_distributed.py"
LAYERS = [f"model.blocks.{i}.{name}" for i in range(2) for name in ("attn.proj", "attn.qkv", "mlp.fc", "mlp.proj")]


def run(kind: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{kind}.json"
    env = dict(os.environ, FPQ_TEST_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), kind, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def check_common(found: dict) -> None:
    assert found["world_size"] == 2
    assert found["converted"] == LAYERS  # lm_head excluded
    assert found["params_kept"] and found["optimizer_holds_params"]
    assert found["active_recipe"].startswith("full e4m3 B=32")  # the switch at step 3 happened
    assert found["ranks_agree"]
    losses = found["losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    found = run("ddp", tmp_path)
    check_common(found)
    assert found["params_kept_from_construction"]  # same Parameter objects as the unconverted model
    assert found["weight_type"] == "Parameter" and found["save_quantized_weight"] is True


@pytest.mark.slow
@pytest.mark.skipif(
    torch.__version__ < "2.7",
    reason="FSDP2 on CPU needs torch >= 2.7 (2.6's fully_shard calls Stream.record_event, which a CPU stream lacks)",
)
def test_fsdp2_model_parallel_two_processes(tmp_path):
    found = run("fsdp2", tmp_path)
    check_common(found)
    assert found["weight_type"] == "DTensor"  # sharded by fully_shard in configure_model, then converted
    # FSDP2 all-gathers before forward: the layer multiplies full (128, 32) plain weights
    assert found["forward_weights"] == [["Parameter", [128, 32]]]
    assert found["save_quantized_weight"] is False  # no full q4(W) copy kept under sharding
