"""analysis/ns_diagnostics.py writes its figures and numbers."""
import json

import pytest

from nanochat.common import UserError


def test_diagnostics_write_figures(tmp_path):
    from analysis.ns_diagnostics import main

    main(["--out-dir", str(tmp_path), "--presets", "quintic,handover8", "--size", "16x48"])
    for name in ("ns_sv_trajectories.png", "ns_spectral_distance.png", "ns_polynomial_maps.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    summary = json.loads((tmp_path / "ns_diagnostics.json").read_text())["presets"]
    assert summary["handover8"]["steps"] == 8 and len(summary["handover8"]["distance_fp32"]) == 8
    assert summary["handover8"]["distance_fp32"][-1] < 5e-3 < summary["quintic"]["distance_fp32"][-1]


def test_diagnostics_bad_input(tmp_path):
    from analysis.ns_diagnostics import main

    with pytest.raises(UserError, match="unknown nanogpt_medium"):
        main(["--out-dir", str(tmp_path), "--presets", "quintic,nanogpt_medium"])
    with pytest.raises(UserError, match="--size"):
        main(["--out-dir", str(tmp_path), "--size", "64"])
