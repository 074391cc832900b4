"""FID: the Fréchet distance between Inception features of the run's images and a reference folder.

    FID = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

tr((S_1 S_2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
S_2^(1/2) S_1 S_2^(1/2) (same eigenvalues as S_1 S_2), which stays real and exact where the
covariances are singular (fewer images than feature dimensions, always the case for small runs),
where scipy's sqrtm of S_1 S_2 needs pytorch-fid's eps fix-up. With n run images the run side's
nonzero spectrum comes from an n x n Gram matrix, so the bootstrap interval (run images resampled,
the reference fixed) costs little even at 2048 dimensions.

FID from few images is biased upward: compare runs at equal image counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Metric, MetricError, MetricOptions, PromptItem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------
# The statistics


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with ddof=1) of (N, D) features, as pytorch-fid computes them."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below zero are rounding: clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt(m: np.ndarray) -> float:
    """tr(m^(1/2)) of a symmetric PSD matrix. Eigenvalues at rounding level (numpy's matrix_rank
    tolerance) count as the zeros they are: their square roots would add noise of sqrt(eps) size."""
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tol = max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return float(np.sqrt(w[w > tol]).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Between two Gaussians given by their moments."""
    root = psd_sqrt(s2)
    tr_covmean = trace_sqrt(root @ s1 @ root)
    d = mu1 - mu2
    return max(0.0, float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))  # < 0 only by rounding


class FrechetToReference:
    """FID of any set of features against fixed reference features (the reference's square root once)."""

    def __init__(self, reference: np.ndarray):
        self.mu, self.sigma = moments(reference)
        self.root = psd_sqrt(self.sigma)
        self.trace = float(np.trace(self.sigma))

    def __call__(self, x: np.ndarray) -> float:
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        mu = x.mean(0)
        xc = (x - mu) / np.sqrt(n - 1)  # S = xc^T xc
        b = xc @ self.root  # (n, D): the nonzero spectrum of root S root is that of b b^T
        tr_covmean = trace_sqrt(b @ b.T if n < b.shape[1] else b.T @ b)
        d = mu - self.mu
        return max(0.0, float(d @ d + (xc * xc).sum() + self.trace - 2.0 * tr_covmean))  # < 0 only by rounding

    def bootstrap(self, x: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float] | None:
        """95 % percentile interval over resamples of x's rows (the reference held fixed)."""
        if resamples < 2 or len(x) < 2:
            return None
        from ..stats import bootstrap_statistic, interval

        return interval(bootstrap_statistic(lambda idx: self(x[idx]), len(x), resamples, seed))


# ----------------------------------------------------------------------------------------------
# Images and features


def reference_images(folder: str | Path) -> list[Path]:
    """A GenEval-layout folder's samples (DIR/<NNNNN>/samples/*.png), else every PNG / JPG in it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MetricError(f"--reference {root}: no such folder")
    layout = sorted(p for d in root.iterdir() if d.is_dir() and d.name.isdigit() for p in d.glob("samples/*.png"))
    if layout:
        return layout
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def inception_features(model, paths: Sequence[Path], batch_size: int = 16, device: str = "cpu",
                       desc: str = "features", progress: bool = False) -> np.ndarray:
    """(N, D) float64 features; each image resized on its own (sizes may differ within a folder)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ..io import load_png

    size = model.config.image_size
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        xs = []
        for p in paths[i : i + batch_size]:
            try:
                im = load_png(p)
            except Exception as e:
                raise MetricError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
            xs.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
        with torch.no_grad():
            out.append(model.features(torch.cat(xs).to(device)).double().cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# The metric


class FID(Metric):
    name = "fid"
    description = "FID of the run's samples against --reference images (Inception-v3 from --inception-path)"
    higher_is_better = False
    kind = "set"

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        from .inception import check_inception_path

        check_inception_path(options.inception_path)
        if not options.reference:
            raise MetricError("--metric fid needs --reference DIR (a folder of PNG / JPG reference images, or a "
                              "GenEval-layout folder)")
        n_ref = len(reference_images(options.reference))
        n_run = sum(len(it.samples) for it in items)
        for what, n in (("--reference " + str(options.reference), n_ref), (str(root), n_run)):
            if n < 2:
                raise MetricError(f"{what}: {n} image{'s' if n != 1 else ''}; FID needs at least 2 on each side")

    def __init__(self, options: MetricOptions):
        from ..backends.flux.loading import resolve_device
        from .inception import load_inception

        super().__init__(options)
        self.device = resolve_device(options.device)
        self.model = load_inception(options.inception_path).to(self.device)

    def info(self) -> dict:
        return {"reference": str(self.options.reference), "inception": str(self.options.inception_path),
                "feature_dim": self.model.feature_dim, "image_size": self.model.config.image_size}

    def evaluate(self, root: Path, items: list[PromptItem], progress: bool = False) -> tuple[list[dict], dict]:
        t0 = time.perf_counter()
        todo = [(it, p) for it in items for p in it.samples]
        ref_paths = reference_images(self.options.reference)
        bs = max(1, self.options.batch_size)
        ref = inception_features(self.model, ref_paths, bs, self.device, "fid reference", progress)
        run = inception_features(self.model, [p for _, p in todo], bs, self.device, "fid run", progress)
        fid = FrechetToReference(ref)
        value = fid(run)
        interval = fid.bootstrap(run, self.options.bootstrap, self.options.seed)
        dist = np.linalg.norm(run - fid.mu, axis=1)
        rows = [{"index": it.index, "filename": str(p.relative_to(root)), "prompt": it.prompt,
                 "category": it.category, "distance_to_reference_mean": round(float(d), 6)}
                for (it, p), d in zip(todo, dist)]
        summary = {"value": value, "ci95": list(interval) if interval else None,
                   "bootstrap": {"resamples": self.options.bootstrap, "seed": self.options.seed,
                                 "over": "the run's images, reference fixed"},
                   "n_images": len(run), "n_prompts": len(items), "n_reference": len(ref),
                   "note": "FID from few images is biased upward; compare runs at equal image counts",
                   "wall_s": round(time.perf_counter() - t0, 3)}
        return rows, summary
