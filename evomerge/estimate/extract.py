"""Choose the reduced item subset a candidate merge is evaluated on.

Every strategy returns item indices plus weights summing to 1, so that
``sum(weights * correct)`` is an unbiased-ish estimate of full accuracy:

* ``random``       uniform sample, equal weights.
* ``stratified``   items sorted by difficulty, cut into ``n`` equal strata, one
                   random item per stratum, weight = stratum share.
* ``anchor-irt``   k-means on the IRT item embeddings (a_j, b_j); the item nearest
                   each centroid is the anchor, weight = cluster share (tinyBenchmarks).
* ``anchor-correctness``  same, clustering the items' correctness across models.

``extract_stages`` picks nested subsets for staged evaluation (racing): the first
stage is ``extract_subset``'s subset, each later stage keeps every item of the
one before and adds items where the earlier ones leave the benchmark uncovered
(k-means with the earlier items as fixed centres, in the strategy's item space);
an item's weight is then the share of items nearest to it. A candidate promoted
to the next stage is scored on the new items only.

Subsets are seeded and saved as json next to the study, so a resumed study
scores candidates on exactly the same items.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.files import read_json, write_json

STRATEGIES = ("random", "stratified", "anchor-irt", "anchor-correctness")
STRATEGY_ALIASES = {"anchor": "anchor-irt"}
"""Short names a search space may use for a strategy."""
STRATEGY_NAMES = (*STRATEGIES[:2], *STRATEGY_ALIASES, *STRATEGIES[2:])
"""Every name a search space accepts."""


def strategy_name(name: str) -> str:
    """The strategy a name (or its alias) stands for."""
    return STRATEGY_ALIASES.get(name, name)

DEFAULT_SUBSET_SIZE = 50
"""Items per benchmark a candidate is scored on when a space does not say (``estimator.subset_size``)."""

ALL_ITEMS = "all"
"""A stage size meaning every item of the benchmark (the last stage of a race may be exact)."""


@dataclasses.dataclass
class Subset:
    """Item indices into the full benchmark plus the weight each stands for."""

    indices: np.ndarray
    weights: np.ndarray
    strategy: str
    seed: int
    n_total: int

    def to_dict(self) -> dict:
        return {
            "indices": [int(i) for i in self.indices],
            "weights": [float(w) for w in self.weights],
            "strategy": self.strategy,
            "seed": int(self.seed),
            "n_total": int(self.n_total),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Subset":
        try:
            subset = cls(
                indices=np.asarray(data["indices"], dtype=np.int64),
                weights=np.asarray(data["weights"], dtype=np.float64),
                strategy=str(data["strategy"]),
                seed=int(data["seed"]),
                n_total=int(data["n_total"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvomergeError(f"subset file is missing or has a bad field: {exc}") from exc
        _check_subset(subset)
        return subset

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Subset":
        data = read_json(path, "subset file")
        return cls.from_dict(data)


def _check_subset(subset: Subset) -> None:
    idx = subset.indices
    if len(idx) == 0 or len(idx) != len(subset.weights):
        raise EvomergeError("subset needs as many weights as indices, and at least one item")
    if idx.min() < 0 or idx.max() >= subset.n_total or len(np.unique(idx)) != len(idx):
        raise EvomergeError(f"subset indices must be distinct and within 0..{subset.n_total - 1}")


def check_subset_size(n_items: int, n_total: int) -> None:
    """A subset larger than the benchmark (or empty) is a user error, not a silent clamp."""
    if n_items < 1:
        raise EvomergeError(f"subset size must be >= 1, got {n_items}")
    if n_items > n_total:
        raise EvomergeError(f"subset of {n_items} items asked for a benchmark of only {n_total} items")


def kmeans(points: np.ndarray, k: int, seed: int, n_init: int = 4, max_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ starts; returns a label per point, all k labels used.

    Duplicated points (common for correctness vectors of few models) can leave
    clusters empty; those are filled by splitting the largest clusters so we
    always get exactly k anchors.
    """
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, rng)
        labels = np.zeros(n, dtype=np.int64)
        for it in range(max_iter):
            new_labels = _nearest_centre(x, centres)
            if it > 0 and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            _move_centres(x, labels, centres)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels.copy()
    return _fill_empty_clusters(best_labels, k, rng)


def _move_centres(x, labels, centres):
    """Each non-empty cluster's centre becomes its members' mean (vectorised: k can be in the hundreds)."""
    k = centres.shape[0]
    counts = np.bincount(labels, minlength=k)
    used = counts > 0
    for d in range(x.shape[1]):
        sums = np.bincount(labels, weights=x[:, d], minlength=k)
        centres[used, d] = sums[used] / counts[used]


def _nearest_centre(x, centres, chunk=8192):
    """Label of the nearest centre per point, without an n x k x d temporary.

    Below 8 dims the squared distances are summed one dimension at a time: the
    same arithmetic (so the same tie-breaking, the same subsets) as numpy's sum
    over the last axis. Wider points (correctness vectors of many models) use
    |x|^2 - 2 x.c + |c|^2, a matrix product, ~10x faster there.
    """
    labels = np.empty(x.shape[0], dtype=np.int64)
    wide = x.shape[1] >= 8
    c_sq = (centres * centres).sum(axis=1)
    for s in range(0, x.shape[0], chunk):
        block = x[s : s + chunk]
        if wide:
            dist = (block * block).sum(axis=1)[:, None] - 2.0 * (block @ centres.T) + c_sq[None, :]
        else:
            dist = np.zeros((block.shape[0], centres.shape[0]))
            for d in range(x.shape[1]):
                diff = block[:, d, None] - centres[None, :, d]
                dist += diff * diff
        labels[s : s + chunk] = dist.argmin(axis=1)
    return labels


def _kmeans_pp(x, k, rng):
    n = x.shape[0]
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = ((x - centres[0]) ** 2).sum(1)
    for c in range(1, k):
        total = closest.sum()
        pick = rng.integers(n) if total <= 0 else rng.choice(n, p=closest / total)
        centres[c] = x[pick]
        closest = np.minimum(closest, ((x - centres[c]) ** 2).sum(1))
    return centres


def _fill_empty_clusters(labels, k, rng):
    labels = labels.copy()
    used = set(np.unique(labels).tolist())
    for c in range(k):
        if c in used:
            continue
        sizes = np.bincount(labels, minlength=k)
        largest = int(sizes.argmax())
        members = np.flatnonzero(labels == largest)
        moved = rng.permutation(members)[: len(members) // 2]
        labels[moved] = c
        used.add(c)
    return labels


def _anchors_from_labels(points, labels, k):
    """Per cluster: the member nearest the centroid, and the cluster's share of items."""
    n = points.shape[0]
    indices, weights = [], []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        centre = points[members].mean(axis=0)
        nearest = members[((points[members] - centre) ** 2).sum(1).argmin()]
        indices.append(int(nearest))
        weights.append(len(members) / n)
    return np.asarray(indices), np.asarray(weights)


def extract_subset(
    n_items: int,
    n_total: int,
    strategy: str = "anchor-irt",
    seed: int = 0,
    *,
    difficulty: np.ndarray | None = None,
    item_embedding: np.ndarray | None = None,
    correctness: np.ndarray | None = None,
) -> Subset:
    """Pick ``n_items`` of ``n_total`` items by ``strategy`` (see module doc).

    ``difficulty`` (items,) is needed by ``stratified``, ``item_embedding``
    (items x features, e.g. [a, b]) by ``anchor-irt``, ``correctness``
    (models x items) by ``anchor-correctness``.
    """
    check_subset_size(n_items, n_total)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        idx = np.sort(rng.choice(n_total, size=n_items, replace=False))
        weights = np.full(n_items, 1.0 / n_items)
    elif strategy == "stratified":
        if difficulty is None or len(difficulty) != n_total:
            raise EvomergeError("stratified extraction needs one difficulty per item")
        order = np.argsort(np.asarray(difficulty), kind="stable")
        strata = np.array_split(order, n_items)
        idx = np.array([int(rng.choice(s)) for s in strata])
        weights = np.array([len(s) / n_total for s in strata])
    elif strategy in ("anchor-irt", "anchor-correctness"):
        points = _item_points(strategy, n_total, difficulty, item_embedding, correctness)
        labels = kmeans(points, n_items, seed)
        idx, weights = _anchors_from_labels(points, labels, n_items)
    else:
        raise EvomergeError(f"unknown subset strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    order = np.argsort(idx)
    subset = Subset(indices=idx[order].astype(np.int64), weights=weights[order] / weights.sum(),
                    strategy=strategy, seed=seed, n_total=n_total)
    _check_subset(subset)
    return subset


def _item_points(strategy, n_total, difficulty, item_embedding, correctness) -> np.ndarray | None:
    """The standardised space a strategy spreads its items over (None for ``random``)."""
    if strategy == "random":
        return None
    if strategy == "stratified":
        points, what = None if difficulty is None else np.asarray(difficulty)[:, None], "one difficulty per item"
    elif strategy == "anchor-irt":
        points, what = item_embedding, "item embeddings (a, b)"
    else:
        points = None if correctness is None else np.asarray(correctness, dtype=np.float64).T
        what = "a models x items correctness matrix"
    if points is None or points.shape[0] != n_total:
        raise EvomergeError(f"{strategy} extraction needs {what} covering all {n_total} items")
    points = np.asarray(points, dtype=np.float64)
    scale = points.std(axis=0)
    return (points - points.mean(axis=0)) / np.where(scale > 1e-12, scale, 1.0)


def stage_sizes(stages, n_total: int, where: str = "stages") -> list[int]:
    """Item counts of nested stages: positive, increasing, ``"all"`` (every item) only last."""
    sizes = []
    for position, size in enumerate(stages):
        if size == ALL_ITEMS and position == len(stages) - 1:
            size = n_total
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise EvomergeError(f"{where}[{position}] must be an item count or 'all' (last only), got {size!r}")
        check_subset_size(int(size), n_total)
        if sizes and size <= sizes[-1]:
            raise EvomergeError(f"{where} must grow from stage to stage, got {list(stages)}")
        sizes.append(int(size))
    if not sizes:
        raise EvomergeError(f"{where} must name at least one stage")
    return sizes


def extract_stages(
    stages,
    n_total: int,
    strategy: str = "anchor-irt",
    seed: int = 0,
    *,
    difficulty: np.ndarray | None = None,
    item_embedding: np.ndarray | None = None,
    correctness: np.ndarray | None = None,
    first: Subset | None = None,
) -> list[Subset]:
    """Nested subsets of the given sizes (ints, the last may be ``"all"``); see the module doc.
    ``first``: the first stage's subset, chosen already (anchors that came with item parameters)."""
    sizes = stage_sizes(stages, n_total)
    if first is not None and (len(first.indices) != sizes[0] or first.n_total != n_total):
        raise EvomergeError(f"the given first stage has {len(first.indices)} of {first.n_total} items, "
                            f"the stages ask for {sizes[0]} of {n_total}")
    subsets = [first if first is not None else
               extract_subset(sizes[0], n_total, strategy, seed, difficulty=difficulty,
                              item_embedding=item_embedding, correctness=correctness)]
    points = None
    rng = np.random.default_rng(seed + 104_729)
    for size in sizes[1:]:
        previous = subsets[-1].indices
        if size == n_total:
            indices = np.arange(n_total)
        elif strategy == "random":
            rest = np.setdiff1d(np.arange(n_total), previous)
            indices = np.concatenate([previous, rng.choice(rest, size - len(previous), replace=False)])
        else:
            if points is None:
                points = _item_points(strategy, n_total, difficulty, item_embedding, correctness)
            indices = _extend_anchors(points, previous, size, rng)
        indices = np.sort(indices).astype(np.int64)
        weights = (np.full(size, 1.0 / size) if strategy == "random" or size == n_total
                   else _nearest_item_shares(points, indices))
        subset = Subset(indices=indices, weights=weights / weights.sum(), strategy=strategy, seed=seed,
                        n_total=n_total)
        _check_subset(subset)
        subsets.append(subset)
    return subsets


def _extend_anchors(points, chosen, size, rng, max_iter=100):
    """``chosen`` plus new items near the centres of k-means run with ``chosen`` as fixed centres."""
    fixed = points[chosen]
    centres = np.vstack([fixed, np.empty((size - len(chosen), points.shape[1]))])
    closest = ((points - fixed[_nearest_centre(points, fixed)]) ** 2).sum(1)
    for c in range(len(chosen), size):  # k-means++ starts, far from what is already covered
        total = closest.sum()
        pick = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=closest / total)
        centres[c] = points[pick]
        closest = np.minimum(closest, ((points - centres[c]) ** 2).sum(1))
    labels = None
    for _ in range(max_iter):
        new_labels = _nearest_centre(points, centres)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        moved = centres.copy()
        _move_centres(points, labels, moved)
        centres[len(chosen):] = moved[len(chosen):]  # the earlier stage's items stay where they are
    taken = set(int(i) for i in chosen)
    added = []
    for c in range(len(chosen), size):
        order = np.argsort(((points - centres[c]) ** 2).sum(1), kind="stable")
        pick = next(int(i) for i in order if int(i) not in taken)
        taken.add(pick)
        added.append(pick)
    return np.concatenate([np.asarray(chosen, dtype=np.int64), np.asarray(added, dtype=np.int64)])


def _nearest_item_shares(points, indices):
    """Weight of each chosen item: the share of all items nearer to it than to any other chosen one."""
    labels = _nearest_centre(points, points[indices])
    return np.bincount(labels, minlength=len(indices)).astype(np.float64) / len(points)


def sample_items(n_total: int, taken: np.ndarray, n_models: int, per_model: int, seed: int) -> list[np.ndarray]:
    """Items beyond ``taken`` for each of ``n_models`` models scored on a sample: ``per_model`` each, drawn
    as consecutive slices of one random order of the other items (wrapping round), so the samples
    together cover as many distinct items as they can while each one is a uniform random draw."""
    rest = np.setdiff1d(np.arange(n_total), np.asarray(taken, dtype=np.int64))
    count = min(int(per_model), len(rest))
    if count <= 0 or n_models <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(max(n_models, 0))]
    order = np.random.default_rng(seed + 31_337).permutation(rest)
    return [np.sort(np.take(order, np.arange(m * count, (m + 1) * count), mode="wrap")) for m in range(n_models)]
