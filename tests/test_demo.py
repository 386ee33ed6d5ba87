"""`sparsecode demo` end to end on a small budget: the fallback to toy data when the model
packages are missing, and the real path on SmolLM2 when they are installed."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sparsecode import demo
from sparsecode.cli import main


def _check_outputs(out: Path, printed: str, *, lm: bool):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == []
    m = summary["metrics"]
    for model in ("dictionary", "sae"):
        assert 0.0 <= m[model]["fvu"] < 1.5 and math.isfinite(m[model]["fvu"])
        assert m[model]["l0"] > 0 and 0.0 <= m[model]["dead_fraction"] <= 1.0
    # the TopK SAE keeps exactly k latents per row (or fewer where pre-activations are <= 0)
    assert m["sae"]["l0"] <= 16 + 1e-9
    gap = m["amortization_gap"]
    assert gap["method"] == "omp" and gap["objective_gap"] >= -1e-3 * abs(gap["sae_objective"])
    conv = summary["convergence"]
    # FISTA reaches a lower objective than ISTA in the same number of iterations
    assert conv["FISTA"]["final_objective"] <= conv["ISTA"]["final_objective"] + 1e-9
    assert (out / "convergence.png").stat().st_size > 5_000
    np.testing.assert_equal(np.load(out / "dictionary.npy").shape[0], 128)
    assert summary["metrics"]["sae"]["l0"] <= (16 if lm else 8) + 1e-9
    assert (out / "sae" / "cfg.json").exists() and (out / "sae" / "sae_weights.safetensors").exists()
    for name in ("sae", "dictionary"):
        index = Path(summary["browsers"][name])
        assert index.exists() and len(list((index.parent / "features").glob("f*.html"))) >= 1
        assert f"file://{index.resolve()}" in printed
    assert "done in" in printed and str((out / "summary.json").resolve()) in printed
    if lm:
        assert summary["data"]["source"] == "smollm2" and summary["data"]["d_in"] == 576
        page = next((Path(summary["browsers"]["sae"]).parent / "features").glob("f*.html")).read_text()
        assert "promoted" in page  # the logit lens through SmolLM2's unembedding
    return summary


def test_demo_falls_back_to_toy_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "model_status", lambda: "the model packages are missing (torch): install them")
    rc = main(["demo", "--quick", "--out", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "the model packages are missing" in printed and "falling back" in printed
    s = _check_outputs(tmp_path / "d", printed, lm=False)
    assert s["data"]["source"] == "toy"
    # toy data carry a ground truth: the scores are reported
    assert 0.0 < s["metrics"]["sae"]["ground_truth_mmcs"] <= 1.0


@pytest.mark.model
def test_demo_on_smollm2(tmp_path, capsys):
    if demo.model_status() is not None:
        pytest.skip(demo.model_status())
    rc = main(["demo", "--quick", "--out", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    assert rc == 0
    _check_outputs(tmp_path / "d", printed, lm=True)


def test_demo_rejects_a_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--tokens", "10", "--out", str(tmp_path / "x")]) == 2
    assert "tokens" in capsys.readouterr().err
