"""ImageFolder data: checks, in-memory decoding of small sets, timm-style transforms.

A dataset directory holds ``train/<class>/*`` and ``val/<class>/*``. Sets of
up to ``IN_MEMORY_LIMIT`` images are decoded once into a uint8 tensor, so a
CPU epoch does not pay for PNG decoding again.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes
from torchvision.transforms import v2

from updp.core.errors import UpdpError

IN_MEMORY_LIMIT = 60_000


class DataError(UpdpError):
    """A dataset directory that is missing, empty or inconsistent."""


def _images(folder: Path) -> list[tuple[str, int]]:
    classes, index = find_classes(str(folder))
    samples = []
    for name in classes:
        for root, _, files in sorted(os.walk(folder / name)):
            samples += [(os.path.join(root, f), index[name]) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    return samples


def _npz(path: Path) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable archive is the same user error
        raise DataError(f"dataset '{path}' is not a readable .npz archive ({type(e).__name__})") from None
    missing = {"train_x", "train_y", "val_x", "val_y", "classes"} - set(data)
    if missing:
        raise DataError(f"dataset '{path}' lacks arrays {', '.join(sorted(missing))}")
    for split in ("train", "val"):
        _check_arrays(path, split, data[f"{split}_x"], data[f"{split}_y"], len(data["classes"]))
    return data


def _check_arrays(path: Path, split: str, x, y, num_classes: int) -> None:
    """uint8 NHWC images (1 or 3 channels) and one integer label in [0, classes) per image."""
    import numpy as np

    where = f"dataset '{path}': {split}_x"
    if not len(x):
        raise DataError(f"dataset '{path}' holds no {split} images")
    if x.dtype != np.uint8:
        raise DataError(f"{where} must be uint8 images (0-255), not {x.dtype}; convert with (x * 255).astype('uint8')")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where} must be NHWC images with 1 or 3 channels last, got shape {tuple(x.shape)}"
                        + ("; transpose NCHW with x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3)
                           else ""))
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"dataset '{path}': {split}_y must hold one label per image ({len(x)}), "
                        f"got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"dataset '{path}': {split}_y must be integer class indices, not {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"dataset '{path}': {split}_y has labels outside 0..{num_classes - 1} "
                        f"(min {y.min()}, max {y.max()}) for its {num_classes} classes")


def check_dataset(root: str | os.PathLike) -> list[str]:
    """The class names, after checking train/ and val/ exist, hold images and agree.

    ``root`` may also be an ``.npz`` archive (``train_x/train_y/val_x/val_y``
    uint8 NHWC images and labels, ``classes``), as the demo data ships.
    """
    root = Path(root)
    if root.suffix == ".npz" and root.is_file():
        return [str(c) for c in _npz(root)["classes"]]
    if not root.is_dir():
        raise DataError(f"dataset directory '{root}' does not exist")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"dataset '{root}' has no {split}/ folder (expected {split}/<class>/<image>)")
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise DataError(f"'{folder}' has no class folders") from None
        if not _images(folder):
            raise DataError(f"'{folder}' holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    if classes["train"] != classes["val"]:
        only = set(classes["train"]) ^ set(classes["val"])
        raise DataError(f"train/ and val/ of '{root}' have different classes (e.g. {', '.join(sorted(only)[:3])})")
    return classes["train"]


class ImageFolderTensors(Dataset):
    """An ImageFolder split (or arrays from an .npz); decoded once into memory when small enough."""

    def __init__(self, folder: str | os.PathLike | None, transform=None, arrays=None):
        self.transform = transform
        self.cache = None
        if arrays is not None:
            images, labels = arrays
            self.cache = [torch.from_numpy(img).permute(2, 0, 1).expand(3, -1, -1).contiguous() for img in images]
            self.samples = [("", int(y)) for y in labels]
            return
        self.samples = _images(Path(folder))
        if len(self.samples) <= IN_MEMORY_LIMIT:
            self.cache = [self._decode(p) for p, _ in self.samples]

    @staticmethod
    def _decode(path: str) -> torch.Tensor:
        try:
            return v2.functional.pil_to_tensor(default_loader(path))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt or truncated files
            raise DataError(f"cannot decode image '{path}' ({type(e).__name__}: {str(e)[:120]}); "
                            "remove or replace the file") from None

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, transform) -> "ImageFolderTensors":
        """The same images (and decoded cache) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, i: int):
        img = self.cache[i] if self.cache is not None else self._decode(self.samples[i][0])
        return (self.transform(img) if self.transform else img), self.samples[i][1]


def transforms(img_size: int, train: bool, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """timm-style: random resized crop + flip for training, resize for evaluation."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train:
        return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), *tail])
    return v2.Compose([v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size), *tail])


@dataclass
class Splits:
    """Training images, a held-out slice of train (for search scoring) and val."""

    classes: list[str]
    train: Dataset
    train_eval: Dataset  # the same training images without augmentation (BN calibration)
    held_out: Dataset
    val: Dataset


def normalization(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """The mean and std the model was trained with, as timm resolves them from its pretrained config."""
    cfg = resolve_data_config(model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def load_splits(root: str | os.PathLike, img_size: int, held_out_every: int = 10,
                mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                std: tuple[float, ...] = IMAGENET_DEFAULT_STD) -> Splits:
    """Every ``held_out_every``-th training image is held out from training for search scoring.

    Images are normalized with ``mean``/``std``: pass the model's (:func:`normalization`).
    """
    classes = check_dataset(root)
    norm = dict(mean=mean, std=std)
    root = Path(root)
    if root.suffix == ".npz":
        arrays = _npz(root)
        aug = ImageFolderTensors(None, transforms(img_size, True, **norm), (arrays["train_x"], arrays["train_y"]))
        val = ImageFolderTensors(None, transforms(img_size, False, **norm), (arrays["val_x"], arrays["val_y"]))
    else:
        aug = ImageFolderTensors(root / "train", transforms(img_size, True, **norm))
        val = ImageFolderTensors(root / "val", transforms(img_size, False, **norm))
    plain = aug.with_transform(transforms(img_size, False, **norm))
    idx = range(len(aug))
    keep = [i for i in idx if i % held_out_every != held_out_every - 1]
    held = [i for i in idx if i % held_out_every == held_out_every - 1]
    return Splits(classes, Subset(aug, keep), Subset(plain, keep), Subset(plain, held), val)


def labels(ds: Dataset) -> list[int]:
    """The class index of every sample, without decoding images where the dataset knows them."""
    if isinstance(ds, Subset):
        base = labels(ds.dataset)
        return [base[i] for i in ds.indices]
    if isinstance(ds, ImageFolderTensors):
        return [y for _, y in ds.samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def stratified_indices(targets: list[int], n: int, seed: int = 0) -> list[int]:
    """``n`` sample indices drawn class by class in proportion to each class's share, then shuffled.

    Seeded: the same ``targets``, ``n`` and ``seed`` give the same indices (every candidate
    plan is scored on the same images). Largest remainders round the per-class quotas.
    """
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    n = min(n, len(targets))
    exact = {c: n * len(idx) / len(targets) for c, idx in sorted(by_class.items())}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[:n - sum(quota.values())]:
        quota[c] += 1
    chosen = [by_class[c][int(j)] for c, k in quota.items()
              for j in torch.randperm(len(by_class[c]), generator=gen)[:k]]
    return [chosen[int(j)] for j in torch.randperm(len(chosen), generator=gen)]


def fixed_batches(ds: Dataset, n: int, seed: int = 0, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A class-stratified seeded sample of ``n`` images as fixed batches (the whole set when ``n`` >= its size).

    ImageFolder files are sorted by class, so the first ``n`` images would be one or two classes.
    """
    idx = list(range(len(ds))) if n >= len(ds) else stratified_indices(labels(ds), n, seed)
    return list(DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False))
