from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from accelvit.config import ConfigError, DataConfig, ModelConfig, ObjectiveConfig
from accelvit.data import StepBatchSampler, ViewDataset, build_loader, load_dataset, read_idx
from accelvit.objectives.simclr import build_transform


def simclr_views(data: DataConfig):
    return build_transform(ObjectiveConfig(), ModelConfig(image_size=16, patch_size=4), data)


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, array, gz)
    assert np.array_equal(read_idx(path), array)


def test_fashion_mnist_from_idx_files_in_any_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5) % 3, False)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))
    image, label = ds[4]
    assert len(ds) == 5 and label == 1
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], images[4])


def test_missing_idx_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no train-images-idx3-ubyte"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))


def test_real_fashion_mnist(fashion_mnist):
    train = load_dataset(DataConfig(dataset="fashion-mnist", root=str(fashion_mnist)))
    test = load_dataset(DataConfig(dataset="fashion-mnist", root=str(fashion_mnist)), train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert {train[i][1] for i in range(100)} == set(range(10))


def keys(sampler: StepBatchSampler) -> list[list[tuple[int, int]]]:
    return list(sampler)


def test_sampler_resumes_and_splits_over_processes_consistently():
    full = keys(StepBatchSampler(size=10, batch_size=4, seed=1, start_step=0, steps=6))
    assert keys(StepBatchSampler(10, 4, 1, start_step=4, steps=6)) == full[4:]
    ranks = [keys(StepBatchSampler(10, 2, 1, 0, 6, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == full
    # each epoch is a permutation of the data
    flat = [index for batch in full for index, _ in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    assert len({seed for batch in full for _, seed in batch}) == 24


def test_views_do_not_depend_on_workers_and_leave_global_rng_alone():
    data = DataConfig(dataset="synthetic", limit=16)
    images, transform = load_dataset(data), simclr_views(data)
    batches = {}
    for workers in (0, 2):
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        sampler = StepBatchSampler(len(images), 4, seed=0, start_step=0, steps=3)
        loader = build_loader(images, transform, workers, sampler)
        batches[workers] = [views for views, _, _ in loader]
        assert torch.equal(torch.random.get_rng_state(), before)
    for a, b in zip(batches[0], batches[2], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    first = batches[0][0]
    assert first[0].shape == (4, 3, 16, 16) and not torch.equal(first[0], first[1])


def test_view_dataset_is_deterministic_per_seed():
    data = DataConfig(dataset="synthetic", limit=4)
    ds = ViewDataset(load_dataset(data), simclr_views(data))
    a, b, c = ds[(1, 7)][0], ds[(1, 7)][0], ds[(1, 8)][0]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_image_folder_with_train_and_val(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (20, 12), color=i * 40).save(folder / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path))
    train, val = load_dataset(cfg), load_dataset(cfg, train=False)
    assert (len(train), len(val)) == (6, 4)
    image, label = train[5]
    assert image.mode == "RGB" and label == 1
    views, _, _ = ViewDataset(train, simclr_views(cfg))[(5, 0)]
    assert [v.shape for v in views] == [(3, 16, 16), (3, 16, 16)]


def test_image_folder_without_val_cannot_evaluate(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="needs a val/ folder"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), train=False)


def _fake_cifar10(root, per_batch: int = 20) -> np.ndarray:
    """CIFAR-10 in torchvision's on-disk format (python pickles), with made-up pixels."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        first = data if first is None else first
        labels = [int(i % 10) for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return first


def test_cifar10_splits_train_and_evaluate(tmp_path, tiny_recipe, monkeypatch):
    import torchvision.datasets.cifar

    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.evaluate import evaluate_run
    from accelvit.train import pretrain

    first = _fake_cifar10(tmp_path / "cifar")
    # torchvision checks the md5 of the real files
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    data = DataConfig(dataset="cifar10", root=str(tmp_path / "cifar"))
    train, test = load_dataset(data), load_dataset(data, train=False)
    assert (len(train), len(test)) == (100, 20)
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 0
    # torchvision stores rows as CHW planes; the image must come back as HWC pixels
    assert np.array_equal(np.asarray(image), first[0].reshape(3, 32, 32).transpose(1, 2, 0))

    cfg = load_config(
        tiny_recipe, ["data.dataset=cifar10", f"data.root={tmp_path / 'cifar'}", "data.limit=null"]
    )
    create_run_dir(tmp_path / "run", cfg)
    pretrain(cfg, tmp_path / "run")
    result = evaluate_run(tmp_path / "run")
    assert (result["train_size"], result["test_size"]) == (100, 20)
    assert 0 <= result["knn_top1"] <= 1


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from accelvit.data import open_rgb

    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(str(tmp_path / "deep.png")))
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == np.arange(256).reshape(16, 16)).all()
