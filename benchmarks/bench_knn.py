"""Benchmark the weighted k-NN evaluation: faiss backend vs torch backend vs a full-matrix baseline.

Contenders (each does fit + evaluation at k = 10, 20, 100, 200 with the DINO weighted vote):

- ``faiss``: ``KNNClassifier(backend="faiss")``, exact ``IndexFlatIP`` search in query batches.
- ``torch``: ``KNNClassifier(backend="torch")``, chunked matrix products (queries and training set).
- ``full_matrix``: the straightforward way, one test x train similarity matrix, one top-k.

Default size: 50,000 train x 10,000 test x 768 dims, 200 classes (L2-normalised clustered random
features). The contenders alternate inside each repeat (the first one rotates); medians are
reported, with ratios against the full-matrix baseline and the peak resident memory added by each
call (sampled from /proc every 2 ms on Linux; CUDA: ``max_memory_allocated``). Predictions are
checked to agree.

``--crossover`` instead times the exact search alone (``InnerProductSearch``: index construction +
top-200 search of all queries) with the faiss and the torch backend at a few sizes, alternating,
median of 3: the measurements behind ``backend="auto"`` (``cmd.eval.choose_backend``).

``--ivf`` compares the approximate ``backend="faiss_ivf"`` with exact torch search on a clustered
200,000 x 256 database and 1,000 queries (k = 20): index build time, search time, recall@20.

Usage:
    python benchmarks/bench_knn.py                 # full size (minutes on 2 CPU cores)
    python benchmarks/bench_knn.py --ivf           # approximate IVF index vs exact search (~1 minute)
    python benchmarks/bench_knn.py --crossover     # faiss vs torch exact search at 6 sizes (~1 minute)
    python benchmarks/bench_knn.py --small         # 5,000 x 1,000 x 128, quick
    python benchmarks/bench_knn.py --device cuda   # torch contenders on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from cmd.eval import InnerProductSearch, KNNClassifier, choose_backend

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_knn.json")
KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory of a block: resident set (CPU, sampled) or CUDA allocations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss_bytes()
        self._high = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._high = max(self._high, _rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._high, _rss_bytes()) - self._base


def make_features(n_train: int, n_test: int, dim: int, n_classes: int, noise: float, seed: int = 0):
    """Clustered features: a random centre per class plus isotropic noise, L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    train_y = torch.randint(0, n_classes, (n_train,), generator=g)
    test_y = torch.randint(0, n_classes, (n_test,), generator=g)
    train = torch.nn.functional.normalize(centres[train_y] + noise * torch.randn(n_train, dim, generator=g), dim=1)
    test = torch.nn.functional.normalize(centres[test_y] + noise * torch.randn(n_test, dim, generator=g), dim=1)
    return train, train_y, test, test_y


def full_matrix_knn(train, train_y, test, n_classes: int) -> dict[int, torch.Tensor]:
    """The straightforward baseline: the whole [test, train] similarity matrix at once."""
    sims = test @ train.T
    top_sims, top_ids = sims.topk(max(KS), dim=1)
    del sims
    neighbour_labels = train_y[top_ids]
    out = {}
    for k in KS:
        votes = torch.zeros(test.shape[0], n_classes, device=test.device)
        votes.scatter_add_(1, neighbour_labels[:, :k], torch.exp(top_sims[:, :k] / TEMPERATURE))
        out[k] = votes.topk(5, dim=1).indices
    return out


CROSSOVER_SIZES = [(1000, 200, 128), (5000, 1000, 384), (20000, 2000, 768), (50000, 2000, 768), (5000, 10, 384),
                   (50000, 10, 768)]


def crossover(repeats: int = 3, out: str | None = None) -> None:
    """Exact search alone, faiss against torch, at the sizes of ``CROSSOVER_SIZES`` (database x queries x D)."""
    torch.manual_seed(0)
    rows = []
    print(f"{'database':>9} {'queries':>8} {'D':>4} {'faiss ms':>9} {'torch ms':>9} {'faiss/torch':>12} {'auto':>6}")
    for m, q, d in CROSSOVER_SIZES:
        db = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
        queries = torch.nn.functional.normalize(torch.randn(q, d), dim=1)
        k = min(200, m)
        times: dict[str, list[float]] = {"faiss": [], "torch": []}
        for r in range(repeats):
            for backend in ("faiss", "torch") if r % 2 == 0 else ("torch", "faiss"):
                start = time.perf_counter()
                InnerProductSearch(db, backend=backend).search(queries, k)
                times[backend].append(time.perf_counter() - start)
        f, t = statistics.median(times["faiss"]), statistics.median(times["torch"])
        auto = choose_backend(m, d, "cpu")
        print(f"{m:>9} {q:>8} {d:>4} {1000 * f:9.1f} {1000 * t:9.1f} {f / t:12.2f} {auto:>6}", flush=True)
        rows.append({"database": m, "queries": q, "dim": d, "k": k, "faiss_s": f, "torch_s": t, "auto": auto})
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"benchmark": "bench_knn_crossover", "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)
        print(f"wrote {out}")


def ivf_vs_exact(nprobes: tuple[int, ...] = (8, 32), out: str | None = None) -> None:
    """``faiss_ivf`` (default nlist) against exact torch search: build, search, recall@20."""
    m, q, d, classes, k = 200_000, 1000, 256, 500, 20
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, d, generator=g)
    db = torch.nn.functional.normalize(centres[torch.randint(0, classes, (m,), generator=g)] + torch.randn(m, d, generator=g), dim=1)
    queries = torch.nn.functional.normalize(centres[torch.randint(0, classes, (q,), generator=g)] + torch.randn(q, d, generator=g), dim=1)
    start = time.perf_counter()
    _, exact = InnerProductSearch(db, backend="torch").search(queries, k)
    exact_s = time.perf_counter() - start
    print(f"{m} x {d} database, {q} queries, k = {k}: exact torch search {exact_s:.2f} s")
    rows = []
    for nprobe in nprobes:
        start = time.perf_counter()
        ivf = InnerProductSearch(db, backend="faiss_ivf", nprobe=nprobe)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        _, approx = ivf.search(queries, k)
        search_s = time.perf_counter() - start
        recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
        print(f"faiss_ivf nlist {ivf.nlist} nprobe {nprobe}: build {build_s:.2f} s, search {search_s:.3f} s, "
              f"recall@{k} {recall:.3f}")
        rows.append({"nlist": ivf.nlist, "nprobe": nprobe, "build_s": build_s, "search_s": search_s, "recall": recall})
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"benchmark": "bench_knn_ivf", "exact_s": exact_s, "rows": rows}, fh, indent=2)
        print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--small", action="store_true", help="5,000 x 1,000 x 128, 50 classes")
    parser.add_argument("--noise", type=float, default=4.0, help="noise / centre scale (task difficulty)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024, help="queries per search step")
    parser.add_argument("--device", default="cpu", help="device of the torch and full-matrix contenders")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--crossover", action="store_true", help="time faiss vs torch exact search at a few sizes")
    parser.add_argument("--ivf", action="store_true", help="approximate faiss_ivf vs exact search, 200,000 x 256")
    args = parser.parse_args()
    if args.ivf:
        ivf_vs_exact(out=args.out.replace("bench_knn.json", "bench_knn_ivf.json"))
        return
    if args.crossover:
        crossover(args.repeats, args.out.replace("bench_knn.json", "bench_knn_crossover.json"))
        return
    if args.small:
        args.n_train, args.n_test, args.dim, args.classes = 5_000, 1_000, 128, 50
    device = torch.device(args.device)

    train, train_y, test, test_y = make_features(args.n_train, args.n_test, args.dim, args.classes, args.noise)
    train_d, train_y_d, test_d = train.to(device), train_y.to(device), test.to(device)

    def run_faiss():
        knn = KNNClassifier(KS, TEMPERATURE, args.classes, backend="faiss", batch_size=args.batch_size)
        return knn.fit(train, train_y).predict(test)

    def run_torch():
        knn = KNNClassifier(KS, TEMPERATURE, args.classes, backend="torch", batch_size=args.batch_size)
        return knn.fit(train_d, train_y).predict(test_d)

    def run_full():
        return full_matrix_knn(train_d, train_y_d, test_d, args.classes)

    contenders: dict[str, Callable[[], dict]] = {"faiss": run_faiss, "torch": run_torch, "full_matrix": run_full}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    peaks: dict[str, list[int]] = {name: [] for name in contenders}
    predictions: dict[str, dict] = {}
    names = list(contenders)
    for r in tqdm(range(args.repeats), desc="repeats"):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                pred = contenders[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            peaks[name].append(mem.peak)
            predictions[name] = {k: v.cpu() for k, v in pred.items()}

    agreement = {
        name: {k: float((predictions[name][k][:, 0] == predictions["full_matrix"][k][:, 0]).float().mean()) for k in KS}
        for name in names
    }
    accuracy = {k: 100.0 * float((predictions["faiss"][k][:, 0] == test_y).float().mean()) for k in KS}
    median = {name: statistics.median(v) for name, v in times.items()}
    peak_mb = {name: max(v) / 2**20 for name, v in peaks.items()}

    size = f"{args.n_train} train x {args.n_test} test x {args.dim} dims, {args.classes} classes, k = {KS}"
    print(f"\nweighted k-NN, {size}, device {device}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'contender':<12} {'median s':>9} {'min s':>8} {'vs full':>8} {'peak MiB':>9} {'top-1 agree':>12}")
    for name in names:
        print(
            f"{name:<12} {median[name]:9.2f} {min(times[name]):8.2f} {median['full_matrix'] / median[name]:7.2f}x "
            f"{peak_mb[name]:9.0f} {min(agreement[name].values()):12.4f}"
        )
    print(f"top-1 accuracy (faiss) by k: {accuracy}")

    result = {
        "benchmark": "bench_knn",
        "size": {"n_train": args.n_train, "n_test": args.n_test, "dim": args.dim, "classes": args.classes, "ks": KS,
                 "noise": args.noise},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "median_s": median,
        "all_s": times,
        "peak_mib": peak_mb,
        "speedup_vs_full_matrix": {name: median["full_matrix"] / median[name] for name in names},
        "top1_agreement_with_full_matrix": agreement,
        "top1_accuracy": accuracy,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
