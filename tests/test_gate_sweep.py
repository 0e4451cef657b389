"""analysis.gate_sweep: the global and per-layer sweeps measure the model at the gates they claim."""
import json

import pytest

from nanochat.common import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_gate_sweep_points_match_the_gates_they_name(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from analysis.gate_sweep import main
    out = tmp_path / "sweep.json"
    result = main(["--checkpoint", str(tiny_mhc_checkpoint), "--grid", "0,0.2,1", "--per-layer-grid", "0.2,1",
                   "--tokens", "1024", "--problems", "synthetic", "--synthetic-steps", "1", "--num-problems", "6",
                   "--batch-size", "4", "--out", str(out)])
    assert json.loads(out.read_text())["global_gate"] == result["global_gate"]
    assert (tmp_path / "sweep.png").stat().st_size > 0
    learned = result["learned"]
    assert learned["gates"] == pytest.approx([0.2] * 4)  # the checkpoint's gates are still at their init
    by_gate = {p["gate"]: p for p in result["global_gate"]}
    # g = 0.2 everywhere is the learned model: same bpb and reward; g = 0 and g = 1 are other models
    assert by_gate[0.2]["val_bpb"] == pytest.approx(learned["val_bpb"], abs=1e-6)
    assert by_gate[0.2]["dense"] == pytest.approx(learned["dense"], abs=1e-6)
    for g in (0.0, 1.0):
        assert abs(by_gate[g]["val_bpb"] - learned["val_bpb"]) > 1e-5 and abs(by_gate[g]["dense"] -
                                                                              learned["dense"]) > 1e-4
    assert [row["layer"] for row in result["per_layer"]] == [0, 1]
    for row in result["per_layer"]:  # moving one layer to its learned value changes nothing; to 1 it does
        at = {p["gate"]: p for p in row["points"]}
        assert at[0.2]["val_bpb"] == pytest.approx(learned["val_bpb"], abs=1e-6)
        assert abs(at[1.0]["val_bpb"] - learned["val_bpb"]) > 1e-5


def test_gate_sweep_bad_input(tiny_base_dir, tiny_baseline_checkpoint, tiny_mhc_checkpoint):
    from analysis.gate_sweep import main
    with pytest.raises(UserError, match="--grid"):
        main(["--checkpoint", str(tiny_mhc_checkpoint), "--grid", "0,1.5"])
    with pytest.raises(UserError, match="without mHC"):
        main(["--checkpoint", str(tiny_baseline_checkpoint)])
