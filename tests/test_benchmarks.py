"""Each benchmark runs on a tiny setting (--smoke) and writes well-formed JSON. No timing is asserted."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics

import pytest

from benchmarks import compression_study, grad_error_cost, overhead, throughput, time_to_accuracy

ENVIRONMENT = {"benchmark", "device", "threads", "versions"}


def written(path, result) -> dict:
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert ENVIRONMENT <= set(on_disk)
    assert set(on_disk["versions"]) == {"torch", "timm", "lightly"}
    return on_disk


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    result = written(out, throughput.main(["--smoke", "-o", str(out)]))
    assert {"model", "batch", "rows", "objective", "workers"} <= set(result)
    rows = {(r["keep"], r["patch"], r["merge"]): r for r in result["rows"]}
    assert set(rows) == {(1.0, 4, 0.0), (0.5, 4, 0.0), (1.0, 8, 0.0), (1.0, 4, 0.25)}
    assert rows[(1.0, 4, 0.0)]["speedup"] == 1.0 and rows[(1.0, 4, 0.0)]["ideal"] == 1.0
    assert rows[(0.5, 4, 0.0)]["tokens"] == 9 and rows[(1.0, 8, 0.0)]["tokens"] == 5
    assert (
        rows[(1.0, 4, 0.25)]["tokens"] == 17 and rows[(1.0, 4, 0.25)]["ideal"] > 1.0
    )  # merged in the blocks
    assert all(r["step_s"] > 0 and r["data_s"] > 0 and r["ideal"] >= 1.0 for r in rows.values())


def test_throughput_smoke_of_a_momentum_objective(tmp_path):
    out = tmp_path / "throughput.json"
    result = written(out, throughput.main(["--smoke", "--objective", "mocov3", "-o", str(out)]))
    full, half = result["rows"][0], result["rows"][1]
    # the key encoder keeps its tokens: the ideal speedup of keep 0.5 is below the backbone's
    assert result["objective"] == "mocov3" and 1.0 < half["ideal"] < 17 / 9
    assert full["efficiency"] == 1.0


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    result = written(out, overhead.main(["--smoke", "-o", str(out)]))
    assert [r["step"] for r in result["rows"]] == ["accelvit", "lightly"]
    assert result["ratio"] == result["rows"][0]["step_s"] / result["rows"][1]["step_s"]
    assert all(r["peak_rss_mib"] >= result["peak_rss_built_mib"] > 100 for r in result["rows"])  # CPU


def test_grad_error_cost_smoke(tmp_path):
    out = tmp_path / "gec.json"
    result = written(out, grad_error_cost.main(["--smoke", "-o", str(out)]))
    assert [r["processes"] for r in result["rows"]] == [1, 2]
    assert all(r["batches"] == 2 and r["estimator_s"] > 0 for r in result["rows"])


def test_time_to_accuracy_smoke(tmp_path, monkeypatch):
    out, runs = tmp_path / "tta.json", tmp_path / "runs"
    argv = ["--smoke", "--objectives", "simclr", "--runs", str(runs), "-o", str(out)]
    result = written(out, time_to_accuracy.main(argv))
    rows = result["rows"]
    first = [(r["recipe"], r["fraction"], r["seed"]) for r in rows[:5]]
    assert first == [("baseline", 1.0, 0)] + [("accel", f, 0) for f in (0.125, 0.25, 0.5, 1.0)]
    matched = result["summary"]["simclr"]["matched_fraction"]
    assert [(r["recipe"], r["fraction"], r["seed"]) for r in rows[5:]] == [
        ("baseline", 1.0, 1),
        ("accel", matched, 1),
    ]
    assert all(0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1 and r["step"] > 0 for r in rows)
    # the accelerated run at B takes more, cheaper steps than the baseline at B
    assert rows[4]["budget"] == pytest.approx(rows[0]["budget"]) and rows[4]["step"] > rows[0]["step"]
    summary = result["summary"]["simclr"]
    assert set(summary["knn"]) >= {"target", "reached"} and 0 <= summary["untrained_knn"] <= 1
    assert summary["baseline_minutes_alone"] > 0  # timed in a throwaway run
    assert set(summary["seeds"]["baseline"]) == {"0", "1"}
    assert out.with_suffix(".png").is_file()
    again = written(out, time_to_accuracy.main(argv))  # every run reused, every score from the cache
    assert again["rows"] == rows
    assert again["summary"]["simclr"]["baseline_alone_timings"] == summary["baseline_alone_timings"]  # kept
    retimed = written(out, time_to_accuracy.main([*argv, "--retime"]))["summary"]["simclr"]
    timings = retimed["baseline_alone_timings"]
    assert timings[0] == summary["baseline_alone_timings"][0] and len(timings) == 2
    assert retimed["baseline_minutes_alone"] == pytest.approx(sum(timings) / 2)  # the median of two
    # another objective measured in an earlier sitting keeps its rows and summary
    other = json.loads(out.read_text())
    other["rows"] = [{**r, "objective": "dino", "run_recipe": f"dino-{i}"} for i, r in enumerate(rows)] + rows
    other["summary"]["dino"] = {**other["summary"]["simclr"], "speedup_budget": 2.0}
    out.write_text(json.dumps(other))
    kept = written(out, time_to_accuracy.main(argv))
    assert [r["objective"] for r in kept["rows"]] == ["dino"] * len(rows) + ["simclr"] * len(rows)
    assert kept["summary"]["dino"]["speedup_budget"] == 2.0 and "simclr" in kept["summary"]
    assert kept["summary"]["simclr"]["partial"] is False
    # scoring while a run still trains elsewhere (--no-train): it is left out, trained by no one, and
    # the summary says it is partial
    import shutil

    from accelvit.checkpoint import latest_checkpoint

    last = latest_checkpoint(runs / "smoke/simclr-accel-0.5-seed0")
    shutil.rmtree(last)
    partial = written(out, time_to_accuracy.main([*argv, "--no-train"]))
    assert [r for r in partial["rows"] if r["objective"] == "simclr"] == [
        r for r in rows if r["fraction"] != 0.5
    ]
    assert partial["summary"]["simclr"]["partial"] is True and not last.exists()
    # a sitting stopped midway keeps the alone timings of the earlier ones (they are not taken again)
    timed = partial["summary"]["simclr"]["baseline_alone_timings"]
    from benchmarks.runs import scored_run

    def stopped(recipe, overrides, run_dir, *args, **kwargs):
        if run_dir.name == "simclr-accel-0.5-seed0":
            raise SystemExit(f"stopped; run the benchmark again to resume {run_dir}")
        return scored_run(recipe, overrides, run_dir, *args, **kwargs)

    monkeypatch.setattr(time_to_accuracy, "scored_run", stopped)
    with pytest.raises(SystemExit):
        time_to_accuracy.main(argv)
    assert json.loads(out.read_text())["summary"]["simclr"]["baseline_alone_timings"] == timed


def test_gpu_size_sets_batch_precision_and_full_splits():
    args = time_to_accuracy.parse_args(["--gpu"])
    gpu = {"train.precision=bf16", "train.batch_size=256", "eval.train_limit=null", "train.eval_every=null"}
    assert args.gpu and gpu <= set(time_to_accuracy.GPU)
    with pytest.raises(SystemExit):
        time_to_accuracy.parse_args(["--smoke", "--gpu"])


def test_speedup_interpolates_in_log_budget():
    rows = [
        {"recipe": "baseline", "seed": 0, "budget": 8, "knn_top1": 0.7, "minutes": 40},
        {"recipe": "accel", "seed": 0, "budget": 1, "knn_top1": 0.6, "minutes": 5},
        {"recipe": "accel", "seed": 0, "budget": 2, "knn_top1": 0.66, "minutes": 10},
        {"recipe": "accel", "seed": 0, "budget": 4, "knn_top1": 0.74, "minutes": 20},
        {
            "recipe": "accel",
            "seed": 1,
            "budget": 4,
            "knn_top1": 0.9,
            "minutes": 20,
        },  # other seeds: noise floor only
    ]
    result = time_to_accuracy.speedup(rows, "knn_top1", 40)
    reached = 2 * 2 ** ((0.7 - 0.66) / (0.74 - 0.66))  # halfway from 2 to 4 in log budget
    assert result["budget"] == pytest.approx(reached)
    assert result["speedup_budget"] == pytest.approx(8 / reached)
    assert result["speedup_wall"] == pytest.approx(
        40 / 15
    )  # baseline minutes over minutes interpolated there
    rows[3]["knn_top1"] = 0.65
    assert time_to_accuracy.speedup(rows, "knn_top1", 40) == {
        "target": 0.7,
        "reached": False,
        "best_accel": 0.66,
    }


def test_compression_study_smoke(tmp_path):
    out = tmp_path / "study.json"
    result = written(out, compression_study.main(["--smoke", "--batches", "2", "-o", str(out)]))
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["baseline", "dropout", "patch", "merge"]
    assert all(0 <= r["knn_top1"] <= 1 and r["budget"] == runs["baseline"]["budget"] for r in runs.values())
    assert all(r["steps"] > runs["baseline"]["steps"] for name, r in runs.items() if name != "baseline")
    rows = result["grad_error"]["strategies"]
    # dropout, patch scaling and merging side by side, the merge fractions matched to dropout's FLOPs
    assert [(r["keep"], r["patch"], r["merge"] > 0) for r in rows] == [
        (0.5, 4, False),
        (1.0, 4, True),
        (0.25, 4, False),
        (1.0, 8, False),
        (0.5, 4, True),
    ]
    assert abs(rows[1]["flops"] - rows[0]["flops"]) < 0.05 and abs(rows[4]["flops"] - rows[2]["flops"]) < 0.05
    assert (tmp_path / "study-grad_error.md").exists() and (tmp_path / "study-entropy.png").stat().st_size > 0
    assert len(result["final_entropy"]["merge"]) == 2  # one entropy per block


def test_learning_smoke_reuses_finished_runs_and_resumes_unfinished(tmp_path):
    import shutil

    from benchmarks import learning

    out, runs = tmp_path / "learning.json", tmp_path / "runs"
    argv = ["--smoke", "--objectives", "mocov3", "--seeds", "0,1", "--runs", str(runs), "-o", str(out)]
    result = written(out, learning.main(argv))
    rows = result["rows"]
    # seed 0 at 1/4, 1/2 and all of the 8 steps; the second seed at the full budget only
    assert [(r["seed"], r["step"], r["budget"]) for r in rows] == [
        (0, 2, 0.25),
        (0, 4, 0.5),
        (0, 8, 1.0),
        (1, 8, 1.0),
    ]
    assert all(0 <= r["knn_top1"] <= 1 and r["encoder"] == "student" for r in rows)
    assert 0 < rows[0]["minutes"] <= rows[1]["minutes"] <= rows[2]["minutes"]
    assert {r["untrained_knn"] for r in rows} == {result["floors"]["mocov3"]["untrained_knn"]}
    assert out.with_suffix(".png").is_file()

    # a second sitting: the finished seed is reused as it is, the unfinished one resumed to the end
    run0, run1 = runs / "smoke/mocov3-baseline-seed0", runs / "smoke/mocov3-baseline-seed1"
    untouched = (run0 / "metrics.jsonl").read_text()
    shutil.rmtree(run1 / "checkpoints/step_8")
    again = written(out, learning.main(argv))
    assert (run0 / "metrics.jsonl").read_text() == untouched
    assert (run1 / "checkpoints/step_8").is_dir()
    assert [r["knn_top1"] for r in again["rows"]] == [r["knn_top1"] for r in rows]  # bit-exact resume
    # scoring while a run still trains elsewhere (--no-train): what is finished, nothing trained; the
    # rows of other objectives in the file stay
    shutil.rmtree(run1 / "checkpoints/step_8")
    partial = written(out, learning.main([*argv, "--no-train"]))
    assert [(r["seed"], r["step"]) for r in partial["rows"]] == [(0, 2), (0, 4), (0, 8)]
    assert not (run1 / "checkpoints/step_8").exists()
    other = json.loads(out.read_text())
    other["rows"].append({**rows[0], "objective": "simclr", "run_recipe": "another"})
    out.write_text(json.dumps(other))
    kept = written(out, learning.main([*argv, "--no-train"]))
    assert [r["objective"] for r in kept["rows"]] == ["simclr", "mocov3", "mocov3", "mocov3"]
    # a run directory of another recipe is never silently reused
    recipe = learning.REPO / "recipes/mocov3-fmnist-baseline.yaml"
    with pytest.raises(SystemExit, match="another recipe"):
        learning.train_run(recipe, [*learning.SMOKE, "train.seed=0", "optim.lr=0.5"], run0)
    # a variant (--set) trains under its own --runs and says so in its rows
    variant = ["--smoke", "--objectives", "mocov3", "--set", "optim.lr=0.5", "--runs", str(tmp_path / "lr")]
    tried = written(tmp_path / "lr.json", learning.main([*variant, "-o", str(tmp_path / "lr.json")]))
    assert {tuple(r["overrides"]) for r in tried["rows"]} == {("optim.lr=0.5",)}
    from accelvit.config import load_config

    assert load_config(tmp_path / "lr/smoke/mocov3-baseline-seed0/recipe.yaml").optim.lr == 0.5


def test_schedule_families_smoke(tmp_path):
    from benchmarks import schedule_families

    out = tmp_path / "families.json"
    argv = ["--smoke", "--objectives", "simclr", "--runs", str(tmp_path / "runs"), "-o", str(out)]
    other = {
        "objective": "mocov3",
        "family": "curriculum",
        "run_recipe": "0" * 16,
        "step": 3,
        "knn_top1": 0.5,
    }
    other |= {"linear_top1": 0.5, "minutes": 1.0, "estimator_minutes": 0.0, "estimator_units": 0.0}
    out.write_text(json.dumps({"rows": [other]}))  # measured in a sitting of its own: kept as it is
    result = written(out, schedule_families.main(argv))
    assert result["rows"][0] == other
    rows = {r["family"]: r for r in result["rows"][1:]}
    assert list(rows) == list(schedule_families.FAMILIES)
    assert all(0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1 for r in rows.values())
    assert rows["adaptive"]["estimator_units"] > 0 and rows["plan"]["estimator_minutes"] > 0
    reports = list((tmp_path / "runs/smoke/simclr-plan-source/grad_error").glob("step_*.json"))
    stages = rows["plan"]["plan"].split(", ")  # one stage per report: "1:8 from 0, 1:4 from 0.75"
    assert len(stages) == len(reports) and all(re.fullmatch(r"[\d.]+:\d+ from [\d.]+", s) for s in stages)
    # constant and random runs cost the curriculum's mean per step: about as many steps at equal budget
    for family in ("constant", "random"):
        assert abs(rows[family]["step"] - rows["curriculum"]["step"]) <= 0.25 * rows["curriculum"]["step"]
    assert rows["uncompressed"]["step"] < rows["curriculum"]["step"]
    # plan-trained's reports (K = 16) come from an uncompressed run of the whole budget, not a quarter
    from accelvit.config import load_config

    runs = tmp_path / "runs" / "smoke"
    budget = load_config(runs / "simclr-curriculum-0.5" / "recipe.yaml").train.budget
    assert load_config(runs / "simclr-plan-source" / "recipe.yaml").train.budget == budget / 4
    assert load_config(runs / "simclr-plan-trained-source" / "recipe.yaml").train.budget == budget
    trained = sorted((runs / "simclr-plan-trained-source/grad_error").glob("step_*.json"))
    assert [json.loads(p.read_text())["batches"] for p in trained] == [16] * len(schedule_families.STAGES)
    # the descent criterion: planned from those reports, and chosen by the adaptive run itself
    assert all("descent" in r for p in trained for r in json.loads(p.read_text())["strategies"])
    assert len(rows["descent-plan"]["plan"].split(", ")) == len(schedule_families.STAGES)
    decisions = (runs / "simclr-descent-adaptive-0.5" / "schedule_decisions.jsonl").read_text().splitlines()
    assert {json.loads(d)["metric"] for d in decisions} == {"descent"}
    decisions = (runs / "simclr-lookahead-adaptive-0.5" / "schedule_decisions.jsonl").read_text().splitlines()
    assert {json.loads(d)["metric"] for d in decisions} == {"lookahead"}
    assert rows["lookahead-adaptive"]["estimator_units"] > 0
    settled = (runs / "simclr-lookahead-settled-adaptive-0.5" / "schedule_decisions.jsonl").read_text()
    measured = [m for d in settled.splitlines() for m in json.loads(d)["measured"].values()]
    assert measured and all(0 < m["settle_steps"] < m["steps"] for m in measured)
    assert all(r["test_size"] > 0 and r["knn_se"] > 0 for r in rows.values())
    # a second seed joins the first's rows in the same JSON, in run directories of its own
    again = written(out, schedule_families.main([*argv, "--seed", "1", "--families", "uncompressed,plan"]))
    assert again["rows"][: len(result["rows"])] == result["rows"]
    seeded = again["rows"][len(result["rows"]) :]
    assert [(r["family"], r["seed"]) for r in seeded] == [("uncompressed", 1), ("plan", 1)]
    assert seeded[0]["run_recipe"] != rows["uncompressed"]["run_recipe"]  # trained, not the seed-0 row
    assert load_config(runs / "simclr-uncompressed-0.5-seed1" / "recipe.yaml").train.seed == 1
    assert (runs / "simclr-plan-seed1.yaml").is_file() and (runs / "simclr-plan-source-seed1").is_dir()
    # re-measuring one family (a lane of its own) keeps every other family's rows of that seed
    (runs / "simclr-plan-0.5").rename(runs / "simclr-plan-0.5-old")
    replanned = written(out, schedule_families.main([*argv, "--families", "plan"]))
    assert [r for r in replanned["rows"] if r["family"] != "plan"] == [
        r for r in again["rows"] if r["family"] != "plan"
    ]
    assert [(r["family"], r["seed"]) for r in replanned["rows"] if r["family"] == "plan"] == [
        ("plan", 1),
        ("plan", 0),
    ]


def test_families_take_the_frontier_points_that_are_the_same_runs(tmp_path):
    from benchmarks import schedule_families

    runs = tmp_path / "runs"
    argv = ["--smoke", "--objectives", "simclr", "--runs", str(runs), "--families", "uncompressed,curriculum"]
    trained = written(tmp_path / "a.json", schedule_families.main([*argv, "-o", str(tmp_path / "a.json")]))
    keys = {r["family"]: r["run_recipe"] for r in trained["rows"]}
    curves = tmp_path / "curves.json"
    point = {"knn": 0.9, "linear": 0.8, "knn_se": 0.003, "linear_se": 0.004, "test_size": 10000}
    point |= {"step": 7, "minutes": 1.5, "run_recipe": keys["curriculum"]}
    curves.write_text(json.dumps({"rows": [point]}))
    shutil.rmtree(runs)  # the curriculum comes from the curves' row; the uncompressed run trains again
    out = tmp_path / "b.json"
    rows = written(out, schedule_families.main([*argv, "-o", str(out), "--curves", str(curves)]))["rows"]
    taken, retrained = rows[1], rows[0]
    assert (taken["family"], taken["knn_top1"], taken["linear_top1"], taken["step"]) == ("curriculum", 0.9, 0.8, 7)
    assert taken["from"] == "time_to_accuracy_curves" and not (runs / "smoke/simclr-curriculum-0.5").exists()
    assert retrained["run_recipe"] == keys["uncompressed"] and "from" not in retrained


def test_family_means_average_seeds_and_read_ties_within_one_standard_error():
    from benchmarks.schedule_families import family_means

    def row(family, seed, knn, linear):
        return {"objective": "simclr", "family": family, "seed": seed, "knn_top1": knn, "linear_top1": linear,
                "knn_se": 0.004, "linear_se": 0.003}  # fmt: skip

    rows = [
        row("curriculum", 0, 0.850, 0.830), row("curriculum", 1, 0.852, 0.834),
        row("descent-plan", 0, 0.860, 0.832), row("descent-plan", 1, 0.858, 0.833),
        {"objective": "simclr", "family": "random", "seed": 0, "knn_top1": 0.9, "linear_top1": 0.9},  # 2k split
    ]  # fmt: skip
    means = {m["family"]: m for m in family_means(rows)}
    assert set(means) == {"curriculum", "descent-plan"}
    hand, new = means["curriculum"], means["descent-plan"]
    assert (hand["seeds"], hand["knn"], hand["linear"]) == ([0, 1], pytest.approx(0.851), pytest.approx(0.832))
    assert hand["knn_se"] == pytest.approx(0.004 / math.sqrt(2))
    assert "knn_vs_curriculum" not in hand
    knn, linear = new["knn_vs_curriculum"], new["linear_vs_curriculum"]
    assert knn["diff"] == pytest.approx(0.008) and knn["se"] == pytest.approx(0.004)
    assert (knn["verdict"], linear["verdict"]) == ("better", "tie")


def test_a_plan_already_trained_is_not_trained_again():
    from benchmarks.schedule_families import _same_plan

    plan = {
        "objective": "mocov3",
        "family": "plan",
        "fraction": 0.25,
        "seed": 1,
        "plan": "1:8 from 0",
        "step": 9,
    }
    rows = [{**plan, "seed": 0}, {**plan, "fraction": 0.5}, plan]
    fields = {
        "objective": "mocov3",
        "family": "plan-trained",
        "fraction": 0.25,
        "seed": 1,
        "plan": "1:8 from 0",
    }
    assert _same_plan(rows, fields) is plan
    assert _same_plan(rows, {**fields, "plan": "1:4 from 0"}) is None
    assert _same_plan(rows, {k: v for k, v in fields.items() if k != "plan"}) is None  # not a plan family


def test_constant_and_random_settings_match_a_mean_cost():
    from accelvit.setting import Setting
    from benchmarks import schedule_families

    def cost(s: Setting) -> float:  # a made-up cost: linear in keep, patch 8 at a quarter
        return s.keep * (0.25 if s.patch == 8 else 1.0)

    fixed = schedule_families.constant_setting(cost, 4, 0.4)
    assert fixed.patch == 4 and fixed.keep == pytest.approx(0.4, abs=1e-3)

    def keys_see_all(s: Setting) -> float:  # MoCo-v3: a quarter of the step is the keys' full forward
        return 0.25 * (0.25 if s.patch == 8 else 1.0) + 0.75 * cost(s)

    # 0.2 is out of dropout's reach at patch 4 (keep 0.25 costs 0.4375): twice the patch, at the keep for 0.2
    fixed = schedule_families.constant_setting(keys_see_all, 4, 0.2)
    assert fixed.patch == 8 and keys_see_all(fixed) == pytest.approx(0.2, abs=1e-3)
    assert schedule_families.constant_setting(keys_see_all, 4, 0.3) == Setting(1.0, 8)  # 0.25 at most
    small, big = schedule_families.random_weights(cost, 4, 0.4)
    assert small * 1.0 + big * 0.25 == pytest.approx(0.4, abs=1e-3) and small + big == pytest.approx(1.0)


def test_a_run_is_reused_across_a_changed_default_of_a_key_inert_in_it(tiny_recipe):
    from accelvit.config import load_config
    from benchmarks.runs import same_run

    run = load_config(tiny_recipe, ["train.grad_error_batches=4", "schedule.adaptive_batches=4"])
    assert same_run(run, load_config(tiny_recipe))  # no estimator points, no adaptive stages: inert
    measured = load_config(tiny_recipe, ["train.grad_error_batches=4", "train.grad_error_at=[0.5]"])
    assert not same_run(measured, load_config(tiny_recipe, ["train.grad_error_at=[0.5]"]))  # K counts there
    assert not same_run(run, load_config(tiny_recipe, ["optim.lr=0.002"]))


def test_estimator_noise_smoke(tmp_path):
    from benchmarks import estimator_noise

    result = estimator_noise.main(["--smoke", "-o", str(tmp_path / "noise.json")])
    choice = [r for r in result["rows"] if r["strategy"] == "(choice)"]
    assert [r["k"] for r in choice] == [2] and 0.0 <= choice[0]["agree"] <= 1.0
    assert {r["strategy"] for r in result["rows"]} >= {"0.5:4", "1:8", "(choice)"}


def test_time_to_accuracy_curves_smoke_scores_both_frontiers_and_reuses_rows(tmp_path, monkeypatch):
    from benchmarks import time_to_accuracy_curves as curves

    out, runs = tmp_path / "curves.json", tmp_path / "runs"
    argv = ["--smoke", "--objectives", "simclr", "--runs", str(runs), "-o", str(out), "--time", "--rounds", "2"]
    result = written(out, curves.main(argv))
    rows = result["rows"]
    assert sorted((r["kind"], r["fraction"]) for r in rows) == sorted(
        [("baseline", f) for f in curves.FRACTIONS["baseline"]]
        + [("accel", f) for f in curves.FRACTIONS["accel"]]
    )
    baseline_steps = {r["fraction"]: r["step"] for r in rows if r["kind"] == "baseline"}
    assert baseline_steps == {0.25: 2, 0.5: 4, 1.0: 8, 2.0: 16}  # each with its own full schedule
    for r in rows:
        assert r["knn_se"] == pytest.approx(math.sqrt(r["knn"] * (1 - r["knn"]) / r["test_size"]))
        assert sum(r["settings"].values()) == r["step"] and r["minutes"] > 0
    accel = [r for r in rows if r["kind"] == "accel"]
    assert all("1:8" in r["settings"] for r in accel)  # the curriculum's patch 8 first
    summary = result["objectives"]["simclr"]
    assert {"pixels_knn", "pixels_linear", "untrained_knn", "step_seconds"} <= set(summary)
    assert {t["patch"] for t in summary["step_seconds"]} == {4, 8}
    # each setting timed in 2 rounds over all of them, the median kept
    assert all(len(t["rounds"]) == 2 and t["units"] == statistics.median(t["rounds"]) for t in summary["step_seconds"])
    assert set(summary["speedup"]) == {"knn", "linear"}
    assert {p.name for p in tmp_path.glob("*.png")} == {"curves-simclr-knn.png", "curves-simclr-linear.png"}
    # a second call trains nothing: every row is found by its run's recipe, even without its run dir
    shutil.rmtree(runs)
    again = curves.main(argv)
    assert not runs.exists() and [r["run_recipe"] for r in again["rows"]] == [r["run_recipe"] for r in rows]
    # the summary (minutes of alone timings) is written before the table is printed: a table that
    # fails loses nothing
    out.write_text(json.dumps({**again, "objectives": {}}))
    monkeypatch.setattr(curves, "format_table", lambda result: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        curves.main(argv)
    timed = json.loads(out.read_text())["objectives"]["simclr"]["step_seconds"]  # timed again, and kept
    assert [(t["keep"], t["patch"]) for t in timed] == [(t["keep"], t["patch"]) for t in summary["step_seconds"]]


def test_curve_to_curve_crossing_and_bounds():
    from benchmarks.time_to_accuracy_curves import bracketing, speedups

    assert bracketing([(1, 0.5), (4, 0.7)], 0.6) == (pytest.approx(2.0), True)  # halfway in log budget
    assert bracketing([(1, 0.5), (4, 0.7)], 0.4) == (1, False)
    assert bracketing([(1, 0.5), (4, 0.7)], 0.8) is None
    rows = [
        {"kind": "baseline", "fraction": f, "budget": b, "knn": y}
        for f, b, y in ((1, 4.0, 0.6), (2, 8.0, 0.7))
    ] + [
        {"kind": "accel", "fraction": 1, "budget": 1.0, "knn": 0.65},
        {"kind": "accel", "fraction": 2, "budget": 2.0, "knn": 0.75},
    ]
    points = speedups(rows, "knn", "budget")
    assert points[0]["ratio"] == pytest.approx(math.sqrt(32) / 1.0) and points[0]["bracketed"]
    assert points[1] == {
        "fraction": 2, "seeds": 1, "budget": 2.0, "knn": 0.75, "ratio": 4.0, "bracketed": False, "bound": "lower"
    }  # fmt: skip


def test_data_path_smoke(tmp_path):
    from benchmarks import data_path

    out = tmp_path / "data_path.json"
    result = written(out, data_path.main(["--smoke", "-o", str(out)]))
    assert result["folder_images_per_s"] > 0 and result["shards_images_per_s"] > 0
    assert result["shards_over_folder"] == pytest.approx(
        result["shards_images_per_s"] / result["folder_images_per_s"]
    )
    assert 0 < result["shard_bytes_per_image"] < 60 * 50 * 3


def test_end_to_end_smoke(tmp_path):
    from benchmarks import end_to_end

    out = tmp_path / "e2e.json"
    result = written(out, end_to_end.main(["--smoke", "-o", str(out)]))
    for side in ("baseline", "accel"):
        assert result[side]["steps"] == 6 and result[side]["wall_s"] > 0  # 4 windows of 2, the first untimed
    assert result["end_to_end"]["budget_ratio"] > 1  # the accelerated recipe's schedule compresses


def test_a_runs_key_ignores_keys_at_their_defaults_and_follows_set_values():
    from accelvit.config import load_config
    from benchmarks.common import REPO
    from benchmarks.runs import recipe_key

    recipe = REPO / "recipes/mocov3-fmnist-baseline.yaml"
    key = recipe_key(load_config(recipe, check_paths=False))
    assert recipe_key(load_config(recipe, ["eval.k=20"], check_paths=False)) == key  # the default
    assert recipe_key(load_config(recipe, ["eval.k=10"], check_paths=False)) != key
    assert recipe_key(load_config(recipe, ["train.seed=1"], check_paths=False)) != key
