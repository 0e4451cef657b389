"""analysis.mhc_stats on tiny trained checkpoints: per-sub-layer statistics, and the bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat.common import UserError

TRAIN = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
         "2", "--total-batch-size", "128", "--data-source", "local", "--eval-tokens", "512", "--eval-every", "-1",
         "--device-type", "cpu", "--dtype", "float32", "--compile", "false", "--num-iterations", "20"]


@pytest.fixture(scope="module")
def checkpoints(tiny_base_dir, tmp_path_factory):
    from scripts.base_train import main as train_main
    results = tmp_path_factory.mktemp("stats_train")
    train_main(TRAIN + ["--model-tag", "stats_mhc", "--mhc-enabled", "--results-dir", str(results)])
    train_main(TRAIN + ["--model-tag", "stats_base", "--results-dir", str(results)])
    return tiny_base_dir


def test_mhc_stats_of_a_trained_model(checkpoints, tmp_path):
    from analysis.mhc_stats import main
    out = tmp_path / "stats.json"
    record = main(["--model-tag", "stats_mhc", "--tokens", "256", "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert record["step"] == 20 and record["num_streams"] == 4 and record["tokens"] == 256
    subs = record["sublayers"]
    assert [(s["layer"], s["kind"]) for s in subs] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    # the reported gates are the checkpoint's sigmoid(gate_logit), read here from the weights themselves, and 20
    # Adam steps at --mhc-lr 0.01 moved each by well over its noise
    from safetensors.torch import load_file
    from nanochat.checkpoint import latest_checkpoint
    weights = load_file(latest_checkpoint(str(checkpoints.base_dir / "checkpoints" / "stats_mhc")) +
                        "/model.safetensors")
    logits = [weights[f"transformer.h.{j // 2}.{'mhc_attn' if j % 2 == 0 else 'mhc_mlp'}.gate_logit"] for j in range(4)]
    for s, logit in zip(subs, logits):
        assert s["gate"] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-7)
        assert abs(s["gate"] - 0.2) > 3e-3   # the gates learned
        assert s["h_res_max_sum_error"] < 1e-3                                     # still doubly stochastic
        assert 0 < s["h_res_dist_init"] and 0.5 < s["h_res_mean_diag"] < 1          # moved, still near I
        assert len(s["h_res_mean"]) == 4 and len(s["h_pre_mean"]) == 4 and len(s["h_post_mean"]) == 4
    assert len(record["readout_static_weights"]) == 4


def test_mhc_stats_refuses_a_baseline_and_missing_arguments(checkpoints):
    from analysis.mhc_stats import main
    with pytest.raises(UserError, match="without mHC"):
        main(["--model-tag", "stats_base", "--tokens", "128", "--batch-size", "2"])
    with pytest.raises(UserError, match="--model-tag"):
        main([])
    with pytest.raises(UserError, match="no_such_tag"):
        main(["--model-tag", "no_such_tag"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device-type cuda"):
            main(["--model-tag", "stats_mhc", "--device-type", "cuda"])
    with pytest.raises(UserError, match="--tokens"):
        main(["--model-tag", "stats_mhc", "--tokens", "0"])
