"""Small torch helpers shared by the deep clusterers (DEC, DeepCluster, ODC)."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

#: rows per chunk when running a network over a whole (possibly memory-mapped) dataset
INFERENCE_BATCH = 8192


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``.

    Deterministic algorithms are requested so CPU runs repeat exactly.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def make_mlp(
    dims: Sequence[int],
    *,
    activation: type[nn.Module] = nn.ReLU,
    batch_norm: bool = False,
    dropout: float = 0.0,
    last_activation: bool = False,
) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]`` with activations between.

    The last layer has no activation unless ``last_activation``.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        is_last = i == len(dims) - 2
        if not is_last or last_activation:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@torch.inference_mode()
def batched_apply(
    module: nn.Module,
    X: np.ndarray,
    device: str | torch.device = "cpu",
    batch_size: int = INFERENCE_BATCH,
) -> np.ndarray:
    """Run ``module`` in eval mode over ``X`` (n, d) in chunks; returns float32 (n, d_out).

    Chunking keeps memory at one chunk of activations, so memory-mapped inputs
    of millions of rows are fine. The module's train/eval mode is restored.
    """
    was_training = module.training
    module.eval()
    outputs: list[np.ndarray] = []
    try:
        for start in range(0, X.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(X[start : start + batch_size]))
            out = module(chunk.to(device=device, dtype=torch.float32))
            outputs.append(out.float().cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(outputs, axis=0)


def state_to_numpy(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as CPU numpy arrays with keys ``prefix + name`` (for safetensors)."""
    return {f"{prefix}{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, tensors: dict[str, np.ndarray], prefix: str) -> None:
    """Inverse of :func:`state_to_numpy`; raises KeyError or ValueError on bad keys."""
    own = module.state_dict()
    state = {}
    for name, ref in own.items():
        key = prefix + name
        if key not in tensors:
            raise KeyError(f"missing tensor {key!r}")
        arr = torch.from_numpy(np.asarray(tensors[key]))
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(
                f"tensor {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
            )
        state[name] = arr.to(ref.dtype)
    module.load_state_dict(state)


@contextlib.contextmanager
def step_threads(device: str) -> Iterator[None]:
    """One torch thread for mini-batch training on CPU, restored afterwards.

    A step is small (256 rows through layers of a few hundred units), so intra-op
    threads gain little, and on a busy machine their spin-waiting made a digits
    pre-training step 40x slower (470 ms vs 12 ms with one thread). Whole-data
    passes (encoding, soft assignment) run with torch's own setting.
    """
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
