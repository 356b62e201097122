from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from accelvit.checkpoint import create_run_dir
from accelvit.cli import main
from accelvit.config import load_config
from accelvit.evaluate import knn_top1, linear_probe_top1
from accelvit.train import pretrain


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_knn_separates_clusters():
    torch.manual_seed(0)
    centres = torch.eye(4)
    train_y = torch.arange(40) % 4
    test_y = torch.arange(12) % 4
    train = F.normalize(centres[train_y] + 0.1 * torch.randn(40, 4), dim=1)
    test = F.normalize(centres[test_y] + 0.1 * torch.randn(12, 4), dim=1)
    assert knn_top1((train, train_y), (test, test_y), k=5) == 1.0


def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 0 against two distant ones of class 1.
    bank = unit([1.0, 0.0], [0.5, 0.866], [0.5, -0.866])
    labels = torch.tensor([0, 1, 1])
    query = unit([0.99, 0.141])
    assert knn_top1((bank, labels), (query, torch.tensor([0])), k=3, temperature=0.07) == 1.0
    # With a flat temperature the two votes of class 1 win.
    assert knn_top1((bank, labels), (query, torch.tensor([1])), k=3, temperature=100.0) == 1.0


def test_linear_probe_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    acc = linear_probe_top1((x[:300], y[:300]), (x[300:], y[300:]), epochs=100)
    assert acc > 0.9


def test_eval_command_writes_eval_json(tmp_path, tiny_recipe, fashion_mnist, capsys):
    run_dir = tmp_path / "run"
    overrides = [
        "--set",
        "data.dataset=fashion-mnist",
        "--set",
        f"data.root={fashion_mnist}",
        "--set",
        "data.limit=256",
        "--set",
        "eval.train_limit=2000",
        "--set",
        "eval.test_limit=500",
    ]
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), *overrides]) == 0
    assert main(["eval", str(run_dir), "--linear", "--checkpoint", "step_3"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 3 and result["k"] == 20
    assert (result["train_size"], result["test_size"]) == (2000, 500)
    assert result["knn_top1"] > 0.3  # chance is 0.1
    assert 0.0 <= result["linear_top1"] <= 1.0
    assert f"kNN top-1 {result['knn_top1']:.4f}" in capsys.readouterr().out


def test_online_knn_is_logged(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.eval_every=3", "eval.train_limit=32", "eval.test_limit=16"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    assert [s for s, _ in knn] == [3, 6]
    assert all(0.0 <= v <= 1.0 for _, v in knn)


def test_eval_of_missing_checkpoint_is_a_clear_error(tmp_path, tiny_recipe, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    assert main(["eval", str(run_dir), "--checkpoint", "step_99"]) == 2
    assert "step_99' does not exist" in capsys.readouterr().err


def test_eval_takes_eval_keys_from_the_command_line(tmp_path, tiny_recipe, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"run directory: {run_dir}\n")  # said when the run starts
    assert main(["eval", str(run_dir), "--set", "eval.k=5", "--set", "eval.test_limit=16"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["k"] == 5 and result["test_size"] == 16
    assert (run_dir / "recipe.yaml").read_text().count("k: 20") == 1  # the run's recipe is left as it was
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--set", "model.depth=3"]) == 2
    assert "--set model.depth: eval takes eval.* keys only" in capsys.readouterr().err


def test_linear_probe_does_not_depend_on_the_global_random_state():
    # scoring the same features twice (a benchmark re-scoring a run in another process) gives one number
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(600, 16, generator=gen)
    y = (x[:, :3].sum(1) + torch.randn(600, generator=gen) > 0).long()
    scores = []
    for state in (0, 12345):
        torch.manual_seed(state)
        scores.append(linear_probe_top1((x[:500], y[:500]), (x[500:], y[500:]), epochs=1))
    assert scores[0] == scores[1]
