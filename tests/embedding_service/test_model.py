"""The DINOv2 backend: loading (hub / local dir / random), precision, forward, pooling."""

from __future__ import annotations

import json
import logging
import threading
import time
from functools import lru_cache

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Model

from embedding_service import model as model_module
from embedding_service.errors import ModelLoadError
from embedding_service.model import (
    POOLINGS,
    RANDOM_SIZES,
    EmbeddingBackend,
    ModelInfo,
    load_backend,
    output_dim,
    pool,
    random_config,
)

HOW_TO_MARKERS = ("huggingface-cli download", "EMBEDDING_MODEL=", "random:small", "HF_HOME")


def _crops(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)


def _photo_crops() -> np.ndarray:
    """224 crops of real photos (sklearn's sample images), varied content."""
    return _photo_crops_cached().copy()


@lru_cache(maxsize=1)
def _photo_crops_cached() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    crops = []
    for img in load_sample_images().images:  # 427 x 640 x 3
        for y, x in ((0, 0), (100, 200), (200, 400), (150, 100)):
            crops.append(img[y : y + 224, x : x + 224])
    return np.stack(crops).astype(np.uint8)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _reference_input(pixels: np.ndarray) -> torch.Tensor:
    """The reference normalisation, written out independently of the backend."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def tiny() -> EmbeddingBackend:
    return load_backend("random:tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[str, Dinov2Model]:
    torch.manual_seed(123)
    ref = Dinov2Model(random_config("tiny")).eval()
    path = tmp_path_factory.mktemp("dinov2-tiny")
    ref.save_pretrained(path)
    return str(path), ref


def _assert_how_to(message: str) -> None:
    for marker in HOW_TO_MARKERS:
        assert marker in message, f"{marker!r} missing from: {message}"


# --- loading -----------------------------------------------------------------


def test_random_tiny_loads_warns_and_says_random(caplog):
    with caplog.at_level(logging.WARNING, logger="embedding_service.model"):
        backend = load_backend("random:tiny", device="cpu")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings, "random weights must log a warning"
    text = warnings[0].getMessage()
    assert "RANDOM WEIGHTS" in text and "MEANINGLESS" in text
    assert text.count("\n") >= 5  # multi-line banner, hard to miss
    info = backend.info
    assert isinstance(info, ModelInfo)
    assert info.random_weights is True
    assert info.model_id == "random:tiny"
    assert info.dim == 32
    assert info.device == "cpu" and info.precision == "fp32" and info.dtype == "float32"
    assert info.attn_implementation == "sdpa"
    assert info.pad_to_batch is False
    json.dumps(info.as_dict())  # JSON-able for /info


def test_random_weights_are_deterministic(tiny):
    other = load_backend("random:tiny", device="cpu")
    x = _crops(2)
    np.testing.assert_array_equal(tiny.forward(x)[0], other.forward(x)[0])


@pytest.mark.parametrize(
    ("size", "hidden", "layers", "heads", "swiglu"),
    [
        ("small", 384, 12, 6, False),
        ("base", 768, 12, 12, False),
        ("large", 1024, 24, 16, False),
        ("giant", 1536, 40, 24, True),
    ],
)
def test_random_config_real_sizes(size, hidden, layers, heads, swiglu):
    cfg = random_config(size)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        hidden,
        layers,
        heads,
    )
    assert cfg.use_swiglu_ffn is swiglu
    assert cfg.patch_size == 14 and cfg.image_size == 518
    assert set(RANDOM_SIZES) == {"tiny", "small", "base", "large", "giant"}


def test_unknown_random_size():
    with pytest.raises(ModelLoadError) as e:
        load_backend("random:huge", device="cpu")
    assert "random:small" in str(e.value) and "huge" in str(e.value)
    _assert_how_to(str(e.value))


def test_bad_directory(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path / "does-not-exist"), device="cpu")
    assert "does not exist" in str(e.value)
    _assert_how_to(str(e.value))
    # a directory that is not a save_pretrained layout
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path), device="cpu")
    assert "config.json" in str(e.value)
    _assert_how_to(str(e.value))


def test_directory_without_weights(tmp_path):
    random_config("tiny").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path), device="cpu")
    assert "no weights" in str(e.value)
    _assert_how_to(str(e.value))


def test_directory_with_wrong_weights_is_refused(tmp_path):
    """Weights that do not cover the model must not silently leave it random."""
    random_config("tiny").save_pretrained(tmp_path)
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path), device="cpu")
    assert "missing" in str(e.value)


def test_directory_with_other_model_type(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_backend(str(tmp_path), device="cpu")
    assert "not dinov2" in str(e.value)


def test_unreachable_hub_fails_fast_with_how_to(monkeypatch, tmp_path):
    """No network here: with HF_HUB_OFFLINE the failure is immediate, never a hang."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache even where one exists
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_backend("facebook/dinov2-small", device="cpu")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "facebook/dinov2-small" in msg
    assert "HF_HUB_OFFLINE" in msg
    _assert_how_to(msg)
    assert "huggingface-cli download facebook/dinov2-small --local-dir" in msg


def test_save_pretrained_round_trip(tiny_dir):
    path, ref = tiny_dir
    backend = load_backend(path, device="cpu")
    assert backend.info.random_weights is False
    assert backend.info.model_id == path
    assert backend.info.dim == 32
    x = _crops(3)
    cls, patch_mean = backend.forward(x)
    with torch.inference_mode():
        out = ref(pixel_values=_reference_input(x))
    np.testing.assert_allclose(cls, out.pooler_output.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        patch_mean, out.last_hidden_state[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5
    )


def test_cls_is_hf_pooler_output(tiny):
    x = _photo_crops()[:4]
    cls, patch_mean = tiny.forward(x)
    assert cls.dtype == np.float32 and patch_mean.dtype == np.float32
    assert cls.shape == patch_mean.shape == (4, 32)
    with torch.inference_mode():
        out = tiny.model(pixel_values=_reference_input(x))
    np.testing.assert_allclose(cls, out.pooler_output.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cls, out.last_hidden_state[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    # 224 px: 16 x 16 patch tokens + CLS
    assert out.last_hidden_state.shape[1] == 257


# --- precision and device ------------------------------------------------------


@pytest.mark.parametrize("bad", ["fp16", "fp8", "int4"])
def test_invalid_cpu_precision(bad):
    with pytest.raises(ModelLoadError) as e:
        load_backend("random:tiny", device="cpu", precision=bad)
    assert bad in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU path")
def test_cuda_requested_without_gpu():
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_backend("random:tiny", device="cuda")
    assert load_backend("random:tiny", device="auto").info.device == "cpu"


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_modes(tiny, precision):
    backend = load_backend("random:tiny", device="cpu", precision=precision)
    assert backend.info.precision == precision
    x = _photo_crops()
    ref_cls, ref_mean = tiny.forward(x)
    cls, patch_mean = backend.forward(x)
    assert cls.dtype == np.float32 and np.isfinite(cls).all() and np.isfinite(patch_mean).all()
    assert _cos(cls, ref_cls).min() > 0.99
    assert _cos(patch_mean, ref_mean).min() > 0.99
    if precision == "int8":
        assert "quantized" in type(backend.model.encoder.layer[0].attention.q_proj).__module__
    else:
        assert backend.info.dtype == "bfloat16"


@pytest.mark.parametrize("flags", [{"amx_int8", "avx512f"}, {"avx512f"}, None])
def test_int8_uses_onednn_only_with_amx(monkeypatch, flags):
    """oneDNN's int8 kernels use AMX tiles (2.4x fp32 at one thread vs 1.6x for the
    default engine); without AMX the default engine is kept. Both must run."""
    monkeypatch.setattr(model_module, "_cpu_flags", lambda: flags)
    before = torch.backends.quantized.engine
    try:
        with_amx = flags is not None and "amx_int8" in flags
        engines = torch.backends.quantized.supported_engines
        expected = "onednn" if with_amx and "onednn" in engines else before
        assert model_module._int8_engine() == expected
        backend = load_backend("random:tiny", device="cpu", precision="int8")
        assert torch.backends.quantized.engine == expected
        cls, _ = backend.forward(_photo_crops()[:2])
        assert np.isfinite(cls).all()
    finally:
        torch.backends.quantized.engine = before


def test_num_threads():
    before = torch.get_num_threads()
    try:
        backend = load_backend("random:tiny", device="cpu", num_threads=1)
        assert torch.get_num_threads() == 1
        assert backend.info.num_threads == 1
    finally:
        torch.set_num_threads(before)


# --- forward ------------------------------------------------------------------


def test_batch_composition_invariance(tiny):
    photos = _photo_crops()[:8]
    alone, alone_mean = tiny.forward(photos[:1])
    batch, batch_mean = tiny.forward(photos)
    assert _cos(alone[0], batch[0]) >= 0.99999
    assert _cos(alone_mean[0], batch_mean[0]) >= 0.99999
    shuffled, _ = tiny.forward(photos[::-1].copy())
    assert _cos(shuffled[-1], alone[0]) >= 0.99999


@pytest.mark.slow
def test_batch_composition_invariance_small_architecture():
    """The same check on the real dinov2-small architecture (random weights), CPU fp32."""
    backend = load_backend("random:small", device="cpu", precision="fp32")
    photos = _photo_crops()[:8]
    alone = pool(*backend.forward(photos[3:4]), "cls_mean", True)
    batch = pool(*backend.forward(photos), "cls_mean", True)
    assert float(alone[0] @ batch[3]) >= 0.99999


def test_pad_to_batch_matches_unpadded(tiny):
    padded = load_backend("random:tiny", device="cpu", pad_to_batch=4)
    assert padded.info.pad_to_batch is True and padded.info.pad_batch_size == 4
    x = _photo_crops()  # 8 images
    for n in (1, 3, 4, 7):  # short, full and multi-chunk (4 + 3) batches
        a_cls, a_mean = tiny.forward(x[:n])
        b_cls, b_mean = padded.forward(x[:n])
        assert b_cls.shape == (n, 32) and b_mean.shape == (n, 32)
        np.testing.assert_allclose(b_cls, a_cls, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b_mean, a_mean, rtol=1e-5, atol=1e-5)


def test_forward_rejects_bad_input(tiny):
    with pytest.raises(ValueError):
        tiny.forward(np.zeros((2, 224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        tiny.forward(np.zeros((224, 224, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        tiny.forward(np.zeros((0, 224, 224, 3), dtype=np.uint8))


def test_forward_thread_safe(tiny):
    x = _photo_crops()
    expected = tiny.forward(x)[0]
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(tiny.forward(x)[0])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-5)


def test_warmup(tiny):
    tiny.warmup(4)
    load_backend("random:tiny", device="cpu", pad_to_batch=2).warmup(8)


# --- pooling ------------------------------------------------------------------


def test_pooling_dims_norms_and_raw():
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(5, 6)).astype(np.float32) * 3
    mean = rng.normal(size=(5, 6)).astype(np.float32)
    for pooling in POOLINGS:
        out = pool(cls, mean, pooling, normalize=True)
        assert out.dtype == np.float32
        assert out.shape == (5, output_dim(6, pooling))
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(pool(cls, mean, "cls", False), cls)
    np.testing.assert_array_equal(pool(cls, mean, "mean", False), mean)
    np.testing.assert_array_equal(pool(cls, mean, "cls_mean", False), np.hstack([cls, mean]))
    assert output_dim(384, "cls") == 384 and output_dim(384, "cls_mean") == 768


def test_pooling_in_float32_and_zero_norm():
    cls = np.zeros((2, 4), dtype=np.float16)
    cls[1] = [3, 4, 0, 0]
    out = pool(cls, cls, "cls", normalize=True)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], [0.6, 0.8, 0, 0], rtol=1e-6)


def test_unknown_pooling():
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="pooling"):
        pool(x, x, "max", True)
    with pytest.raises(ValueError, match="pooling"):
        output_dim(4, "max")


def test_pooled_output_through_backend(tiny):
    x = _crops(3)
    for pooling in POOLINGS:
        emb = tiny.embed(x, pooling=pooling)
        assert emb.shape == (3, output_dim(tiny.info.dim, pooling))
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


# --- precision advice and compile fallback --------------------------------------


def test_bf16_warns_without_native_bf16(monkeypatch, caplog):
    import embedding_service.model as model_mod

    monkeypatch.setattr(model_mod, "_cpu_flags", lambda: {"avx512f", "avx2"})
    with caplog.at_level(logging.WARNING, logger="embedding_service.model"):
        backend = load_backend("random:tiny", device="cpu", precision="bf16")
    assert any("bf16" in w and "fp32" in w for w in backend.info.warnings)
    assert any("native bf16" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(model_mod, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert load_backend("random:tiny", device="cpu", precision="bf16").info.warnings == []


def test_int8_warns_below_bar(caplog):
    with caplog.at_level(logging.WARNING, logger="embedding_service.model"):
        backend = load_backend("random:tiny", device="cpu", precision="int8")
    assert any("1.8x" in w for w in backend.info.warnings)
    assert load_backend("random:tiny", device="cpu", precision="fp32").info.warnings == []


def test_revision_ignored_for_directory(tiny_dir):
    path, _ = tiny_dir
    backend = load_backend(path, device="cpu", revision="v1")
    assert backend.info.revision is None
    assert any("ignored" in w for w in backend.info.warnings)


def test_compile_failure_falls_back_to_eager(monkeypatch, tiny):
    def broken_compile(module, **kwargs):
        def run(**inputs):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    backend = load_backend("random:tiny", device="cpu", compile=True, pad_to_batch=4)
    assert backend.info.compiled is True
    backend.warmup(4)
    assert backend.info.compiled is False
    assert any("torch.compile failed" in w for w in backend.info.warnings)
    x = _crops(2)
    np.testing.assert_allclose(backend.forward(x)[0], tiny.forward(x)[0], rtol=1e-5, atol=1e-5)
