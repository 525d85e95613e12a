"""Weighted k-nearest-neighbour classification on frozen features (the DINO k-NN protocol)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .label_fraction import class_balanced_subset
from .search import BACKENDS, Backend, InnerProductSearch, check_features

__all__ = ["KNNClassifier", "check_labels"]


def check_labels(labels: torch.Tensor | Sequence[int], name: str, n_rows: int, features_name: str) -> torch.Tensor:
    """``labels`` as a CPU int64 tensor [N], checked against ``n_rows`` feature rows."""
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor [N], got dtype {y.dtype} and shape {tuple(y.shape)}")
    if y.shape[0] != n_rows:
        raise ValueError(f"{name} has {y.shape[0]} entries but {features_name} has {n_rows} rows")
    y = y.to(device="cpu", dtype=torch.long)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got {int(y.min())}")
    return y


class KNNClassifier:
    """DINO's weighted k-NN classifier, exact and memory-bounded.

    Each test feature is compared by cosine similarity with every training feature; its k nearest
    training samples vote for their class with weight ``exp(sim / temperature)``; the classes are
    ranked by total vote, ties broken by the lowest class index. The search runs once with the
    largest k and is sliced for the smaller ones.

    Args:
        k: one k or several (each evaluated); a k above the number of training samples is clamped
            to it, with a warning (the result keeps the requested k as key).
        temperature: T of the vote weights, > 0.
        num_classes: number of classes; inferred as ``max(train_labels) + 1`` when None.
        backend: ``"auto"`` (default: the faster exact search for the features' device and size:
            torch's chunked matrix products on CUDA and for all but small training sets on the CPU,
            faiss ``IndexFlatIP`` for small ones, see [`choose_backend`][cmd.eval.choose_backend]),
            ``"torch"``, ``"faiss"``, or ``"faiss_ivf"`` (approximate ``IndexIVFFlat``, for
            training sets too large for exact search; tune with ``nlist`` / ``nprobe``).
        batch_size: test samples per search step (bounds memory; the torch backend also walks the
            training set in chunks, so 1,000,000 x 768 training features are fine).
        normalize: L2-normalise train and test features (cosine similarity); set False only for
            features that are already normalised.
        nlist: inverted lists of ``"faiss_ivf"`` (None: about ``sqrt(N)``).
        nprobe: lists scanned per test sample by ``"faiss_ivf"``.

    Example:
        >>> import torch
        >>> train = torch.randn(100, 16)
        >>> labels = torch.arange(100) % 4
        >>> knn = KNNClassifier(k=(1, 5)).fit(train, labels)
        >>> knn.evaluate(train[:7], labels[:7])[1]["top1"]
        100.0
    """

    def __init__(
        self,
        k: int | Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        num_classes: int | None = None,
        backend: Backend = "auto",
        batch_size: int = 1024,
        normalize: bool = True,
        *,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        ks = (k,) if isinstance(k, int) else tuple(k)
        if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
            raise ValueError(f"k must be a positive int or a non-empty sequence of them, got {k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.ks: tuple[int, ...] = tuple(dict.fromkeys(ks))
        self.temperature = float(temperature)
        self.num_classes = num_classes
        self.backend: Backend = backend
        self.batch_size = batch_size
        self.normalize = normalize
        self.nlist = nlist
        self.nprobe = nprobe
        self._search: InnerProductSearch | None = None
        self._train_labels: torch.Tensor | None = None
        self._num_classes: int | None = None

    @property
    def num_train(self) -> int:
        """Number of training samples kept by [`fit`][cmd.eval.KNNClassifier.fit] (0 before)."""
        return 0 if self._train_labels is None else int(self._train_labels.shape[0])

    def fit(
        self,
        train_features: torch.Tensor,
        train_labels: torch.Tensor | Sequence[int],
        *,
        label_fraction: float | None = None,
        seed: int = 0,
    ) -> KNNClassifier:
        """Index the training set.

        Args:
            train_features: [N, D] floating tensor.
            train_labels: [N] integer labels in [0, num_classes).
            label_fraction: keep only a seeded, class-balanced fraction of the training samples
                (see `cmd.eval.label_fraction.class_balanced_subset`).
            seed: seed of that draw.

        Returns:
            self.
        """
        check_features(train_features, "train_features")
        y = check_labels(train_labels, "train_labels", train_features.shape[0], "train_features")
        if y.numel() == 0:
            raise ValueError("train_features is empty: the k-NN classifier needs at least one training sample")
        n_cls = int(y.max()) + 1 if self.num_classes is None else self.num_classes
        if int(y.max()) >= n_cls:
            raise ValueError(f"train_labels must lie in [0, num_classes={n_cls}), got a label {int(y.max())}")
        if label_fraction is not None:
            keep = class_balanced_subset(y, label_fraction, seed)
            train_features, y = train_features[keep.to(train_features.device)], y[keep]
        x = train_features.detach().float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        self._search = InnerProductSearch(
            x, backend=self.backend, batch_size=self.batch_size, nlist=self.nlist, nprobe=self.nprobe
        )
        self._train_labels = y
        self._num_classes = n_cls
        return self

    def _effective_ks(self) -> dict[int, int]:
        n = self.num_train
        too_big = [k for k in self.ks if k > n]
        if too_big:
            warnings.warn(
                f"k = {too_big} exceed the {n} training samples; clamped to {n}", UserWarning, stacklevel=3
            )
        return {k: min(k, n) for k in self.ks}

    def predict(self, test_features: torch.Tensor) -> dict[int, torch.Tensor]:
        """Ranked class predictions for every k.

        Args:
            test_features: [Q, D] floating tensor.

        Returns:
            {k: [Q, min(5, k)] int64 class indices, best first} on the CPU.
        """
        if self._search is None:
            raise RuntimeError("call fit(train_features, train_labels) before predict / evaluate")
        check_features(test_features, "test_features", self._search.dim, "the training features")
        ks = self._effective_ks()
        q = test_features.detach().float()
        if self.normalize:
            q = F.normalize(q, dim=1)
        k_max = max(ks.values())
        sims, ids = self._search.search(q, k_max)  # [Q, k_max], best first
        sims, ids = sims.cpu(), ids.cpu()
        found = ids >= 0  # an approximate index may find fewer than k_max neighbours
        neighbour_labels = self._train_labels[ids.clamp_min(0)]  # [Q, k_max]
        # exp(sim / T) up to a per-query factor exp(-max sim / T): the ranking is unchanged and
        # the weights lie in (0, 1] for any temperature (no overflow); a missing neighbour weighs 0.
        best = torch.where(found[:, :1], sims[:, :1], torch.zeros_like(sims[:, :1]))
        weights = torch.where(found, torch.exp((sims - best) / self.temperature), torch.zeros_like(sims))
        out: dict[int, torch.Tensor] = {}
        for k, k_eff in ks.items():
            n_top = min(5, k_eff)
            ranked = []
            for start in range(0, q.shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                votes = torch.zeros(weights[rows].shape[0], self._num_classes, dtype=torch.float32)
                votes.scatter_add_(1, neighbour_labels[rows, :k_eff], weights[rows, :k_eff])
                # a stable descending sort keeps equal votes in increasing class order
                ranked.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :n_top])
            out[k] = torch.cat(ranked) if ranked else torch.empty(0, n_top, dtype=torch.long)
        return out

    def evaluate(
        self, test_features: torch.Tensor, test_labels: torch.Tensor | Sequence[int]
    ) -> dict[int, dict[str, float]]:
        """Accuracy of the weighted vote on a labelled test set.

        Args:
            test_features: [Q, D] floating tensor (any Q >= 1).
            test_labels: [Q] integer labels in [0, num_classes); classes may be missing.

        Returns:
            {k: {"top1": %, "top5": %, "mean_per_class_top1": %}}; top-5 is over min(5, k)
            classes, and the per-class mean averages the top-1 accuracy of the classes present in
            ``test_labels``.
        """
        if self._search is None:
            raise RuntimeError("call fit(train_features, train_labels) before predict / evaluate")
        check_features(test_features, "test_features", self._search.dim, "the training features")
        y = check_labels(test_labels, "test_labels", test_features.shape[0], "test_features")
        if y.numel() == 0:
            raise ValueError("test_features is empty")
        if int(y.max()) >= self._num_classes:
            raise ValueError(
                f"test_labels must lie in [0, num_classes={self._num_classes}), got a label {int(y.max())}"
            )
        results = {}
        for k, ranked in self.predict(test_features).items():
            correct = ranked == y[:, None]
            top1 = correct[:, 0].double()
            per_class_sum = torch.zeros(self._num_classes, dtype=torch.float64).index_add_(0, y, top1)
            per_class_n = torch.bincount(y, minlength=self._num_classes).double()
            present = per_class_n > 0
            results[k] = {
                "top1": 100.0 * float(top1.mean()),
                "top5": 100.0 * float(correct.any(dim=1).double().mean()),
                "mean_per_class_top1": 100.0 * float((per_class_sum[present] / per_class_n[present]).mean()),
            }
        return results
