"""The batcher on its own: a fake backend whose inputs identify each image."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from embedding_service.batcher import Batcher
from embedding_service.errors import InvalidImage, NotReady, Overloaded, ServiceError


class FakeBackend:
    """An image is a 2x2 crop filled with one value; its features are that value.

    ``gate`` (when set) blocks every forward until released; ``fail_on`` makes
    a batch holding that value raise; ``die_on`` raises a BaseException that
    kills the model thread.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_on: int | None = None
        self.die_on: int | None = None
        self.warmed_with: int | None = None

    def warmup(self, batch_size: int) -> None:
        self.warmed_with = batch_size

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = [int(v) for v in images[:, 0, 0, 0]]
        self.batches.append(values)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on in values:
            raise RuntimeError("boom")
        if self.die_on in values:
            raise SystemExit("worker killed")
        cls = images.reshape(len(images), -1)[:, :3].astype(np.float32)
        return cls, cls * 2

    @property
    def seen(self) -> list[int]:
        return [v for batch in self.batches for v in batch]


def fake_preprocess(image: str, index: int) -> np.ndarray:
    if not image.isdigit():
        raise InvalidImage(f"image {index} is not an image", index=index)
    return np.full((2, 2, 3), int(image), np.uint8)


def run(
    test: Callable[[Batcher, FakeBackend], Awaitable[None]],
    backend: FakeBackend | None = None,
    **kwargs: int,
) -> FakeBackend:
    backend = backend or FakeBackend()
    options = {"batch_size": 4, "max_queue_images": 64, "preprocess_workers": 2, **kwargs}

    async def main() -> None:
        batcher = Batcher(backend, fake_preprocess, **options)
        await batcher.start()
        try:
            await test(batcher, backend)
        finally:
            await batcher.close()

    asyncio.run(main())
    return backend


def images(*values: int) -> list[str]:
    return [str(v) for v in values]


def test_warms_up_with_a_full_batch_and_returns_features_in_input_order() -> None:
    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        result = await batcher.embed(images(*range(10)))
        assert result.cls[:, 0].tolist() == list(range(10))
        assert np.array_equal(result.patch_mean, result.cls * 2)
        assert result.cls.dtype == np.float32
        assert result.queue_time >= result.preprocess_time >= 0
        assert result.inference_time > 0
        assert batcher.depth == 0
        with pytest.raises(ValueError):
            await batcher.embed([])

    backend = run(test)
    assert backend.warmed_with == 4
    # A long request is split into fixed-size batches.
    assert [len(b) for b in backend.batches] == [4, 4, 2]


def test_does_not_wait_for_a_full_batch_when_idle() -> None:
    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        started = time.perf_counter()
        await batcher.embed(images(7))
        assert time.perf_counter() - started < 0.5
        assert backend.batches == [[7]]

    run(test, batch_size=64)


def test_concurrent_requests_share_batches() -> None:
    backend = FakeBackend()
    backend.gate = threading.Event()

    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        first = asyncio.create_task(batcher.embed(images(1)))
        await asyncio.to_thread(backend.entered.wait, 5)  # the model is busy with [1]
        others = [asyncio.create_task(batcher.embed(images(10 + i, 20 + i))) for i in range(4)]
        while batcher.depth < 9:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # all decoded and queued
        backend.gate.set()
        await first
        results = await asyncio.gather(*others)
        for i, result in enumerate(results):
            assert result.cls[:, 0].tolist() == [10 + i, 20 + i]

    run(test, backend, batch_size=8)
    assert backend.batches[0] == [1]
    # The eight queued images of four requests went through in one batch.
    assert sorted(backend.batches[1]) == sorted([10, 20, 11, 21, 12, 22, 13, 23])
    assert len(backend.batches) == 2


def test_refuses_at_once_when_the_queue_is_full() -> None:
    backend = FakeBackend()
    backend.gate = threading.Event()

    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        held = asyncio.create_task(batcher.embed(images(*range(6))))
        await asyncio.to_thread(backend.entered.wait, 5)  # 6 images admitted, model busy
        started = time.perf_counter()
        with pytest.raises(Overloaded) as caught:
            await batcher.embed(images(1, 2, 3))  # 6 + 3 > 8
        assert time.perf_counter() - started < 0.1
        assert caught.value.status == 429
        assert caught.value.extra["retry_after"] == 1
        small = asyncio.create_task(batcher.embed(images(9, 9)))  # 6 + 2 <= 8: admitted
        await asyncio.sleep(0.05)
        assert batcher.depth == 8
        backend.gate.set()
        assert (await small).cls[:, 0].tolist() == [9, 9]
        await held
        assert batcher.depth == 0

    run(test, backend, batch_size=4, max_queue_images=8)


def test_a_cancelled_request_never_reaches_the_model() -> None:
    backend = FakeBackend()
    backend.gate = threading.Event()

    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        busy = asyncio.create_task(batcher.embed(images(1)))
        await asyncio.to_thread(backend.entered.wait, 5)
        gone = asyncio.create_task(batcher.embed(images(50, 51, 52)))
        kept = asyncio.create_task(batcher.embed(images(60)))
        while batcher.depth < 5:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # both are decoded and waiting for the model
        gone.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.depth == 2
        backend.gate.set()
        await busy
        assert (await kept).cls[:, 0].tolist() == [60]

    run(test, backend)
    assert backend.seen == [1, 60]


def test_one_bad_image_fails_its_request_with_the_lowest_index_before_the_model() -> None:
    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        with pytest.raises(InvalidImage) as caught:
            await batcher.embed(["1", "2", "bad", "3", "worse"])
        assert caught.value.extra["index"] == 2
        assert backend.batches == []
        assert batcher.depth == 0
        result = await batcher.embed(images(4, 5))
        assert result.cls[:, 0].tolist() == [4, 5]

    run(test)


def test_a_model_error_fails_only_that_batch_and_the_worker_carries_on() -> None:
    backend = FakeBackend()
    backend.fail_on = 13

    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        with pytest.raises(ServiceError) as caught:
            await batcher.embed(images(11, 12, 13))
        assert caught.value.status == 500
        assert batcher.alive
        result = await batcher.embed(images(14, 15))
        assert result.cls[:, 0].tolist() == [14, 15]
        assert batcher.depth == 0

    run(test, backend)


def test_a_dead_worker_fails_waiting_requests_and_refuses_new_ones_fast() -> None:
    backend = FakeBackend()
    backend.die_on = 66

    async def test(batcher: Batcher, backend: FakeBackend) -> None:
        with pytest.raises(ServiceError) as caught:
            await asyncio.wait_for(batcher.embed(images(66)), 5)
        assert caught.value.status == 500
        assert not batcher.alive
        assert isinstance(batcher.death, SystemExit)
        started = time.perf_counter()
        with pytest.raises(NotReady):
            await batcher.embed(images(1))
        assert time.perf_counter() - started < 0.1
        assert batcher.depth == 0

    run(test, backend)


def test_close_fails_queued_requests() -> None:
    backend = FakeBackend()
    backend.gate = threading.Event()

    async def main() -> None:
        batcher = Batcher(
            backend, fake_preprocess, batch_size=1, max_queue_images=8, preprocess_workers=1
        )
        await batcher.start(warmup=False)
        first = asyncio.create_task(batcher.embed(images(1)))
        second = asyncio.create_task(batcher.embed(images(2)))
        await asyncio.to_thread(backend.entered.wait, 5)
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        backend.gate.set()
        await closing
        with pytest.raises(NotReady):
            await second
        await asyncio.gather(first, return_exceptions=True)
        with pytest.raises(NotReady):
            await batcher.embed(images(3))

    asyncio.run(main())
    assert backend.seen == [1]
