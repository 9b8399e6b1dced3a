import json

from kernelwarehouse.cli import main


def test_kw_models_lists_every_budget_with_reference_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    baselines = [r for r in rows if r["budget"].startswith("K=")]
    rows = [r for r in rows if not r["budget"].startswith("K=")]
    assert len(rows) == 20 and len(baselines) == 10
    assert all(r["matches_reference"] for r in rows)
    assert all(r["matches_reference"] for r in baselines if r["model"].startswith("odconv"))
    quarter = next(r for r in rows if r["model"] == "kw_resnet18" and r["budget"] == "1/4x")
    assert quarter["params"] == 4031768 and quarter["paper_params_m"] == 4.08
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "kw_convnext_tiny" in table and "39,370,674=" in table
