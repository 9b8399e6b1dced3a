import json

from kernelwarehouse.cli import main


def test_kw_models_lists_every_budget_with_reference_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20
    assert all(r["matches_reference"] for r in rows)
    quarter = next(r for r in rows if r["model"] == "kw_resnet18" and r["budget"] == "1/4x")
    assert quarter["params"] == 4031768 and quarter["paper_params_m"] == 4.08
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "kw_convnext_tiny" in table and "39,370,674=" in table
