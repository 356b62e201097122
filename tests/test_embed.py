"""accelvit embed: one row per image, the features accelvit eval computes for it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from accelvit.checkpoint import create_run_dir, run_recipe
from accelvit.cli import main
from accelvit.compress import forward_features
from accelvit.config import DataConfig
from accelvit.data import load_dataset
from accelvit.evaluate import extract_features, load_backbone
from accelvit.train import pretrain


@pytest.fixture
def folder(tmp_path):
    """Seven images in two class folders, of several sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(7):
        side = (20, 28, 33)[i % 3]
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        path = root / ("cats" if i < 4 else "dogs") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        (image.convert("L") if i == 5 else image).save(path)
    return root


def test_embed_writes_the_features_eval_computes_for_each_image(tmp_path, tiny_config, folder, capsys):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)

    out = tmp_path / "emb.npy"
    assert main(["embed", str(run_dir), "--data", str(folder), "-o", str(out), "--batch-size", "3"]) == 0
    features = np.load(out)
    paths = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert features.shape == (7, 32) and features.dtype == np.float32
    assert paths == [f"cats/{i:02d}.png" for i in range(4)] + [f"dogs/{i:02d}.png" for i in range(4, 7)]

    # eval's features of the same images (an imagefolder dataset of that folder), same order
    vit, _ = load_backbone(run_dir, run_recipe(run_dir))
    vit.eval()
    images = load_dataset(DataConfig(dataset="imagefolder", root=str(folder), workers=0), train=True)
    expected, labels = extract_features(
        lambda x: forward_features(vit, x), images, tiny_config.model.image_size, 4, torch.device("cpu")
    )
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert torch.allclose(torch.from_numpy(features), expected, atol=1e-6)

    # a folder without class sub-folders: the same images, the same vectors
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in folder.rglob("*.png"):
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    assert main(["embed", str(run_dir), "--data", str(flat), "-o", str(tmp_path / "flat.npy")]) == 0
    assert (tmp_path / "flat.paths.txt").read_text().splitlines() == [p.replace("/", "-") for p in paths]
    assert np.array_equal(np.load(tmp_path / "flat.npy"), features)

    # from an export, as .csv: the same rows
    exported = tmp_path / "backbone.safetensors"
    assert main(["export", str(run_dir), "-o", str(exported)]) == 0
    table = tmp_path / "emb.csv"
    assert main(["embed", str(exported), "--data", str(folder), "-o", str(table), "--workers", "0"]) == 0
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["path"] + [f"f{i}" for i in range(32)]
    assert [r[0] for r in rows[1:]] == paths
    assert np.array_equal(np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float32), features)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{empty}", "-o", "{tmp}/e.npy"], "holds no image"),
        (["--data", "{images}", "-o", "{tmp}/e.txt"], "the format follows the suffix, one of .npy, .csv, .parquet"),
        (["--data", "{images}", "-o", "{tmp}/e.npy", "--encoder", "teacher"], "holds one encoder"),
    ],
)
def test_embed_refuses_bad_input_in_one_line(tmp_path, folder, capsys, args, message):
    (tmp_path / "empty").mkdir()
    source = tmp_path / "b.safetensors"
    source.write_bytes(b"")
    fill = {"empty": tmp_path / "empty", "tmp": tmp_path, "images": folder}
    before = sorted(tmp_path.rglob("*"))
    assert main(["embed", str(source), *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("accelvit: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_embed_as_parquet(tmp_path, tiny_config, folder):
    pq = pytest.importorskip("pyarrow.parquet")
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    assert main(["embed", str(run_dir), "--data", str(folder), "-o", str(tmp_path / "e.npy"), "--workers", "0"]) == 0
    assert main(["embed", str(run_dir), "--data", str(folder), "-o", str(tmp_path / "e.parquet"), "--workers", "0"]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["path", "embedding"]
    assert table.column("path").to_pylist() == (tmp_path / "e.paths.txt").read_text().splitlines()
    assert np.array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), np.load(tmp_path / "e.npy"))
