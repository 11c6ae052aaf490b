"""Fixed image subsets (BN calibration, scoring, validation) cover every class in proportion."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from updp.train.data import fixed_batches, labels, load_splits, stratified_indices

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "cifar10_demo.npz"
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"


def _class_sorted_folder(root: Path, per_class: dict[str, int]) -> Path:
    """An ImageFolder tree from the demo data, classes of unequal size (files sort by class)."""
    from PIL import Image

    with np.load(DEMO) as f:
        x, y = f["train_x"], f["train_y"]
    for split in ("train", "val"):
        for c, (name, n) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True)
            for i in np.flatnonzero(y == c)[:n]:
                Image.fromarray(x[i]).save(root / split / name / f"{i:05d}.png")
    return root


def _imagenette_copy(root: Path, n: int) -> Path:
    """A small class-sorted copy of Imagenette, in the test's temporary directory only."""
    for split in ("train", "val"):
        src = IMAGENETTE / split
        for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((src / cls).iterdir())[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def _assert_proportional(counts: Counter, population: Counter, n: int) -> None:
    assert sum(counts.values()) == n
    total = sum(population.values())
    for c, size in population.items():
        assert abs(counts[c] - n * size / total) < 1, (c, counts[c], n * size / total)


def test_stratified_indices_are_proportional_seeded_and_distinct():
    targets = [0] * 500 + [1] * 300 + [2] * 150 + [3] * 50
    idx = stratified_indices(targets, 100, seed=3)
    assert len(set(idx)) == 100
    _assert_proportional(Counter(targets[i] for i in idx), Counter(targets), 100)
    assert idx == stratified_indices(targets, 100, seed=3)
    assert idx != stratified_indices(targets, 100, seed=4)
    assert [targets[i] for i in idx[:10]] != sorted(targets[i] for i in idx[:10])  # classes are mixed in batches


@pytest.mark.parametrize("source", ["cifar", "imagenette"])
def test_every_fixed_subset_covers_every_class_on_a_class_sorted_folder(tmp_path, source):
    if source == "imagenette":
        if not IMAGENETTE.is_dir():
            pytest.skip(f"{IMAGENETTE} is not present")
        root, size = _imagenette_copy(tmp_path / "data", 30), 32
    else:
        sizes = dict(zip([f"c{i}" for i in range(10)], [60, 50, 40, 40, 30, 30, 30, 20, 20, 20]))
        root, size = _class_sorted_folder(tmp_path / "data", sizes), 32
    splits = load_splits(root, size)
    for ds, n in ((splits.train_eval, 64), (splits.held_out, 20), (splits.val, 50)):
        population = Counter(labels(ds))
        assert len(ds) > n  # a sample, not the whole set
        assert population.keys() == set(range(len(splits.classes)))
        batches = fixed_batches(ds, n, seed=0, batch_size=16)
        counts = Counter(int(y) for _, ys in batches for y in ys)
        _assert_proportional(counts, population, n)
        again = fixed_batches(ds, n, seed=0, batch_size=16)
        assert all((a[1] == b[1]).all() for a, b in zip(batches, again))  # same images for every candidate
