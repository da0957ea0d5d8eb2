"""The DINOv2 model backend: loading, device/precision, forward pass, pooling.

``load_backend(model)`` accepts

* a Hugging Face hub id (default ``facebook/dinov2-small``; ``revision=`` pins a
  branch, tag or commit; ``HF_HUB_OFFLINE=1`` is honoured and makes a missing
  model fail at once instead of after the hub client's retries),
* a local directory in ``save_pretrained`` layout (``config.json`` +
  ``model.safetensors``), e.g. made with
  ``hf download facebook/dinov2-small --local-dir ./models/dinov2-small``,
* ``random:<size>`` (``tiny``/``small``/``base``/``large``/``giant``): the real
  architecture with RANDOM weights, for tests and benchmarks only. It is only
  ever used when asked for by name, logs a loud warning and reports
  ``random_weights=True``.

Anything that cannot be loaded raises :class:`~embedding_service.errors.ModelLoadError`
whose message says how to provide weights.

``EmbeddingBackend.forward(uint8 crops (B, 224, 224, 3))`` returns the raw
``(cls, patch_mean)`` float32 features; :func:`pool` turns them into the
requested embedding (``cls`` / ``mean`` / ``cls_mean``, L2-normalised in
float32). On CUDA the uint8 crops travel through pinned memory and are
normalised on the device; ``pad_to_batch`` pads every batch to a fixed size
(stable shapes for CUDA graphs / ``torch.compile``) on any device.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from embedding_service.errors import ModelLoadError
from embedding_service.preprocess import to_model_input

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/dinov2-small"
RANDOM_PREFIX = "random:"
RANDOM_SIZES: tuple[str, ...] = ("tiny", "small", "base", "large", "giant")
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls_mean")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
CUDA_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
CROP_SIZE = 224

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.float32,  # dynamic quantisation: float32 activations, int8 Linear weights
}

# Real DINOv2 sizes (facebook/dinov2-*): hidden, layers, heads, swiglu.
_ARCH: dict[str, tuple[int, int, int, bool]] = {
    "tiny": (32, 2, 2, False),
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


# ---------------------------------------------------------------------------
# Configuration and information


def random_config(size: str) -> Dinov2Config:
    """The DINOv2 architecture of ``size`` (see RANDOM_SIZES); ``tiny`` is a minimal test model."""
    if size not in _ARCH:
        raise ModelLoadError(
            f"unknown random model size {size!r}; choose one of "
            + ", ".join(f"random:{s}" for s in RANDOM_SIZES)
        )
    hidden, layers, heads, swiglu = _ARCH[size]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        use_swiglu_ffn=swiglu,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )


@dataclass
class ModelInfo:
    model_id: str
    revision: str | None
    dim: int  # hidden size (the ``cls`` / ``mean`` embedding dimension)
    device: str
    dtype: str
    precision: str
    random_weights: bool
    attn_implementation: str
    pad_to_batch: bool
    pad_batch_size: int | None = None
    compiled: bool = False
    num_threads: int | None = None
    num_parameters: int = 0
    load_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # e.g. a precision that is slow here

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_dim(hidden: int, pooling: str) -> int:
    """Embedding dimension for ``pooling`` on a model with ``hidden`` features."""
    _check_pooling(pooling)
    return 2 * hidden if pooling == "cls_mean" else hidden


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def pool(cls: np.ndarray, patch_mean: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """Pick/concatenate features and optionally L2-normalise (always in float32).

    ``cls`` and ``patch_mean`` are (B, hidden) as returned by ``EmbeddingBackend.forward``.
    A zero vector stays zero under normalisation (no NaN).
    """
    _check_pooling(pooling)
    if pooling == "cls":
        out = np.asarray(cls, dtype=np.float32)
    elif pooling == "mean":
        out = np.asarray(patch_mean, dtype=np.float32)
    else:
        out = np.concatenate(
            [np.asarray(cls, dtype=np.float32), np.asarray(patch_mean, dtype=np.float32)], axis=-1
        )
    if normalize:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norms, np.float32(1e-12))
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------
# Loading


def _how_to(model: str) -> str:
    hub_id = model if _looks_like_hub_id(model) else DEFAULT_MODEL
    local = "./models/" + hub_id.split("/")[-1]
    return (
        "How to provide DINOv2 weights:\n"
        "  1. give this process access to the Hugging Face Hub (network access to huggingface.co;\n"
        "     HF_HOME chooses the cache directory, HF_TOKEN authenticates if needed); or\n"
        "  2. on a machine with access run\n"
        f"       huggingface-cli download {hub_id} --local-dir {local}\n"
        f"     (or: hf download {hub_id} --local-dir {local}), copy the directory here\n"
        f"     and set EMBEDDING_MODEL=/path/to/{local.removeprefix('./')}; or\n"
        "  3. for testing only: EMBEDDING_MODEL=random:small (real architecture, RANDOM weights,\n"
        "     meaningless embeddings)."
    )


def _load_error(model: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"Could not load DINOv2 model {model!r}: {reason}\n{_how_to(model)}")


def _looks_like_path(model: str) -> bool:
    """A local directory (as opposed to a hub id ``org/name``)."""
    return (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or Path(model).expanduser().exists()
    )


def _looks_like_hub_id(model: str) -> bool:
    return not model.startswith(RANDOM_PREFIX) and not _looks_like_path(model)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_device(device: str) -> torch.device:
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} requested but CUDA is not available "
            f"(torch {torch.__version__}); use device=auto or cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def _resolve_precision(precision: str, device: torch.device) -> str:
    precision = (precision or "auto").strip().lower()
    aliases = {
        "float32": "fp32",
        "float": "fp32",
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "qint8": "int8",
    }
    precision = aliases.get(precision, precision)
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision not in CUDA_PRECISIONS:
            raise ModelLoadError(
                f"precision {precision!r} is not available on CUDA; choose one of "
                f"{', '.join(CUDA_PRECISIONS)} (int8 dynamic quantisation is CPU only)"
            )
        return precision
    if precision == "auto":
        return "fp32"
    if precision not in CPU_PRECISIONS:
        raise ModelLoadError(
            f"precision {precision!r} is not available on CPU; choose one of "
            f"{', '.join(CPU_PRECISIONS)} (fp16 is GPU only)"
        )
    return precision


def _cpu_flags() -> set[str] | None:
    """CPU feature flags from /proc/cpuinfo (Linux), None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _precision_warnings(prec: str, device: torch.device) -> list[str]:
    """Honest advice for the CPU opt-in precisions (numbers: docs/benchmarks/precision.md)."""
    if device.type != "cpu":
        return []
    out: list[str] = []
    if prec == "bf16":
        flags = _cpu_flags()
        native = flags is not None and bool(flags & {"avx512_bf16", "amx_bf16"})
        if not native:
            out.append(
                "precision bf16 on a CPU without native bf16 matrix instructions "
                "(no avx512_bf16 / amx_bf16"
                + (" in /proc/cpuinfo" if flags is not None else "; CPU flags unknown")
                + "): measured 0.25-0.5x the speed of fp32 on such a CPU (bf16 matmuls are "
                "emulated). "
                "Use precision=fp32, or int8 for speed. See docs/benchmarks/precision.md."
            )
    elif prec == "int8":
        out.append(
            "precision int8 (dynamic quantisation of nn.Linear) measured 1.3-1.6x fp32 "
            "throughput at 2 threads, below the project's 1.8x bar for a recommended mode "
            "(2.4x only at 1 thread on a CPU with AMX-INT8); on CPUs with AMX or AVX512-BF16, "
            "bf16 measured 2.0-3.3x. Cosine to fp32 was >= 0.996 with random weights; int8 "
            "fidelity with real DINOv2 weights is unverified (ViT activation outliers can hurt "
            "int8): check with `python bench/precision.py --model <your model>`. "
            "See docs/benchmarks/precision.md."
        )
    return out


_RANDOM_BANNER = "!" * 78


def _warn_random(model: str) -> None:
    logger.warning(
        "\n%s\n"
        "!!! EMBEDDING MODEL %s HAS RANDOM WEIGHTS.\n"
        "!!! The architecture is real DINOv2 but NOTHING was loaded: the embeddings are\n"
        "!!! MEANINGLESS and useless for clustering or search. Use this for tests and\n"
        "!!! benchmarks only. For real embeddings set EMBEDDING_MODEL to a hub id\n"
        "!!! (e.g. facebook/dinov2-small) or a local save_pretrained directory.\n"
        "%s",
        _RANDOM_BANNER,
        model,
        _RANDOM_BANNER,
    )


def _build_random(model: str, dtype: torch.dtype) -> Dinov2Model:
    size = model[len(RANDOM_PREFIX) :].strip().lower()
    if size not in _ARCH:
        raise _load_error(
            model,
            f"unknown random model size {size!r}; choose one of "
            + ", ".join(f"random:{s}" for s in RANDOM_SIZES),
        )
    config = random_config(size)
    # Deterministic weights: the same random:<size> gives the same vectors in every process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Dinov2Model._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    _warn_random(model)
    return net.to(dtype)


_ALLOWED_MISSING = {"embeddings.mask_token"}  # only used for masked pre-training


def _load_pretrained(model: str, revision: str | None, dtype: torch.dtype) -> Dinov2Model:
    is_path = _looks_like_path(model)
    source: str = model
    if is_path:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise _load_error(model, f"local model directory {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise _load_error(
                model, f"{str(path)!r} has no config.json (expected a save_pretrained directory)"
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise _load_error(
                model, f"{str(path)!r} has no weights (model.safetensors or pytorch_model.bin)"
            )
        source = str(path)
    kwargs: dict[str, Any] = {
        "attn_implementation": "sdpa",
        "dtype": dtype,
        "output_loading_info": True,
    }
    if not is_path:
        kwargs["revision"] = revision
        if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
            kwargs["local_files_only"] = True
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            source,
            **{k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")},
        )
        if getattr(cfg, "model_type", None) not in ("dinov2",):
            raise _load_error(
                model,
                f"it is a {getattr(cfg, 'model_type', None)!r} model, not dinov2 "
                "(this service serves DINOv2 / Dinov2Model checkpoints)",
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            net, loading_info = Dinov2Model.from_pretrained(source, config=cfg, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        offline = " (offline mode: HF_HUB_OFFLINE is set)" if kwargs.get("local_files_only") else ""
        raise _load_error(model, f"{type(e).__name__}: {e}{offline}") from e
    missing = set(loading_info.get("missing_keys") or ()) - _ALLOWED_MISSING
    mismatched = loading_info.get("mismatched_keys") or ()
    if missing or mismatched:
        detail = sorted(missing)[:5] + [str(m) for m in list(mismatched)[:5]]
        raise _load_error(
            model,
            f"the checkpoint does not contain the DINOv2 weights ({len(missing)} missing, "
            f"{len(mismatched)} mismatched tensors, e.g. {detail}); refusing to run with "
            "partially random weights",
        )
    return net


def _int8_engine() -> str:
    """The quantised-kernel library for int8: oneDNN where the CPU has AMX-INT8.

    oneDNN's dynamic int8 Linear uses AMX tiles; the default x86/fbgemm kernels
    do not (dinov2-small, batch 8, one thread on an AMX Xeon: oneDNN 1.9x fp32,
    x86 1.3x; without AMX both measured the same, docs/benchmarks/precision.md).
    """
    flags = _cpu_flags() or set()
    if "amx_int8" in flags and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return torch.backends.quantized.engine


def _quantize_int8(net: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    # The engine is process-wide and must stay the same at run time: weights are
    # packed for the engine that quantised them.
    torch.backends.quantized.engine = _int8_engine()
    logger.info("int8 dynamic quantisation with the %s engine", torch.backends.quantized.engine)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but still works and
        # torchao is not a dependency.
        warnings.simplefilter("ignore")
        return quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------------------
# The backend


class EmbeddingBackend:
    """A loaded DINOv2 model. ``forward`` is serialised by a lock (one worker thread)."""

    def __init__(
        self,
        net: nn.Module,
        info: ModelInfo,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pad_batch: int | None,
        compile: bool,
    ) -> None:
        self.model = net
        self.info = info
        self.device = device
        self.dtype = dtype
        self.pad_batch = pad_batch
        self._lock = threading.Lock()
        self._run: Callable[..., Any] = net
        self._compile_checked = not compile
        if compile:
            self._run = torch.compile(net, dynamic=pad_batch is None)

    # -- core -----------------------------------------------------------------

    def _forward_chunk(self, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = chunk.shape[0]
        if self.pad_batch is not None and n < self.pad_batch:
            padded = np.zeros((self.pad_batch, *chunk.shape[1:]), dtype=np.uint8)
            padded[:n] = chunk
            chunk = padded
        x = torch.from_numpy(chunk)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        pixel_values = to_model_input(x, self.dtype)
        out = self._call_model(pixel_values)
        hidden = out.last_hidden_state[:n]
        cls = hidden[:, 0].float()
        patch_mean = hidden[:, 1:].float().mean(dim=1)
        return cls, patch_mean

    def _call_model(self, pixel_values: torch.Tensor) -> Any:
        if self._compile_checked:
            return self._run(pixel_values=pixel_values)
        # First call of a compiled model: compilation happens here. A model that
        # cannot be compiled (no C++ compiler, unsupported op) runs eagerly instead.
        try:
            out = self._run(pixel_values=pixel_values)
        except Exception as e:
            message = f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); running eagerly"
            logger.warning("%s", message)
            self.info.warnings.append(message)
            self.info.compiled = False
            self._run = self.model
            out = self._run(pixel_values=pixel_values)
        self._compile_checked = True
        return out

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) crops -> (cls, patch_mean), float32 (B, hidden), not normalised."""
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError("pixels must be a uint8 numpy array of shape (B, H, W, 3)")
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] == 0:
            raise ValueError(f"pixels must have shape (B>0, H, W, 3), got {pixels.shape}")
        pixels = np.ascontiguousarray(pixels)
        step = self.pad_batch or pixels.shape[0]
        cls_parts: list[np.ndarray] = []
        mean_parts: list[np.ndarray] = []
        with self._lock, torch.inference_mode():
            for start in range(0, pixels.shape[0], step):
                cls, patch_mean = self._forward_chunk(pixels[start : start + step])
                cls_parts.append(cls.cpu().numpy())
                mean_parts.append(patch_mean.cpu().numpy())
        if len(cls_parts) == 1:
            return cls_parts[0], mean_parts[0]
        return np.concatenate(cls_parts), np.concatenate(mean_parts)

    def embed(self, pixels: np.ndarray, pooling: str = "cls", normalize: bool = True) -> np.ndarray:
        """Convenience: ``pool(*forward(pixels), pooling, normalize)``."""
        return pool(*self.forward(pixels), pooling, normalize)

    def warmup(self, batch_size: int) -> None:
        """One full batch (twice when compiled: compilation, then a steady-state run)."""
        batch_size = max(1, int(self.pad_batch or batch_size))
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(batch_size, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        for _ in range(2 if self.info.compiled else 1):
            cls, patch_mean = self.forward(pixels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if not (np.isfinite(cls).all() and np.isfinite(patch_mean).all()):
            raise ModelLoadError(
                f"warm-up produced non-finite features with precision {self.info.precision!r} "
                f"on {self.info.device}; try precision=fp32"
            )
        logger.info(
            "warm-up: batch %d in %.3fs on %s (%s)",
            batch_size,
            time.perf_counter() - t0,
            self.info.device,
            self.info.precision,
        )


def load_backend(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    pad_to_batch: int | None = None,
    compile: bool = False,
    num_threads: int | None = None,
) -> EmbeddingBackend:
    """Load DINOv2 (hub id, local directory or ``random:<size>``); raises ModelLoadError."""
    t0 = time.perf_counter()
    model = (model or DEFAULT_MODEL).strip()
    dev = _resolve_device(device)
    prec = _resolve_precision(precision, dev)
    if pad_to_batch is not None and int(pad_to_batch) < 1:
        raise ModelLoadError(f"pad_to_batch must be a positive batch size, got {pad_to_batch}")
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ModelLoadError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(int(num_threads))
    # int8 quantises a float32 model; everything else loads straight into its dtype.
    dtype = _TORCH_DTYPES[prec]
    is_random = model.lower().startswith(RANDOM_PREFIX)
    if is_random:
        net = _build_random(model, dtype)
        resolved_revision = None
    else:
        net = _load_pretrained(model, revision, dtype)
        resolved_revision = getattr(net.config, "_commit_hash", None) or revision
        if _looks_like_path(model):
            resolved_revision = None
    hidden = int(net.config.hidden_size)
    attn = str(getattr(net.config, "_attn_implementation", None) or "eager")
    n_params = sum(p.numel() for p in net.parameters())
    net.eval()
    net.requires_grad_(False)
    if prec == "int8":
        net = _quantize_int8(net)
    net = net.to(dev)
    info = ModelInfo(
        model_id=model,
        revision=resolved_revision,
        dim=hidden,
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        precision=prec,
        random_weights=is_random,
        attn_implementation=attn,
        pad_to_batch=pad_to_batch is not None,
        pad_batch_size=int(pad_to_batch) if pad_to_batch is not None else None,
        compiled=bool(compile),
        num_threads=torch.get_num_threads() if dev.type == "cpu" else None,
        num_parameters=int(n_params),
        warnings=_precision_warnings(prec, dev),
    )
    if revision is not None and _looks_like_path(model):
        info.warnings.append(f"revision {revision!r} ignored for the local directory {model!r}")
    for message in info.warnings:
        logger.warning("%s", message)
    backend = EmbeddingBackend(
        net,
        info,
        device=dev,
        dtype=dtype,
        pad_batch=int(pad_to_batch) if pad_to_batch is not None else None,
        compile=compile,
    )
    info.load_seconds = round(time.perf_counter() - t0, 3)
    logger.info(
        "loaded %s (revision %s) on %s, precision %s, dim %d, attention %s, %.1fs%s",
        model,
        resolved_revision,
        dev,
        prec,
        hidden,
        attn,
        info.load_seconds,
        " [RANDOM WEIGHTS]" if is_random else "",
    )
    return backend
