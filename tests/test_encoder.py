"""The sentence encoder: shapes, normalisation, agreement with the plain-transformers
reference, the micro-batcher, and ``manage.py bench encoder``. Everything on the CPU."""

from __future__ import annotations

import functools
import io
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.management import call_command

from mlengine import facade
from mlengine.inference import encoder, quantized

TEXTS = [
    "@united my flight was delayed three hours and nobody told us why",
    "Thanks @JetBlue, the crew was wonderful! #fleek",
    "ok",
    "🔥🔥🔥",
    "Terremoto en Costa Rica: se reportan daños en San José http://t.co/abc",
    "Explosion at the fertilizer plant in West, Texas. Praying for everyone #prayfortexas",
    "",
    "word " * 400,  # longer than the model's 256 tokens: truncated
]


def test_embed_gives_unit_float32_vectors_in_input_order() -> None:
    vectors = facade.embed(TEXTS)

    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Input order, whatever order the length buckets ran in.
    alone = facade.embed([TEXTS[5]])[0]
    assert float(vectors[5] @ alone) > 0.999
    assert facade.embed([]).shape == (0, 384)


@functools.cache
def _cpu_encoder(dtype: str) -> encoder.Encoder:
    return encoder.Encoder(device="cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_both_cpu_production_paths_match_the_reference(dtype: str) -> None:
    # Which one a worker runs depends on its CPU (default_cpu_dtype); both are checked.
    production = _cpu_encoder(dtype).embed(TEXTS)
    reference = encoder.reference_embed(TEXTS)

    cosine = (production * reference).sum(axis=1)
    assert cosine.min() >= 0.98, cosine


@pytest.mark.parametrize(
    ("amx", "bf16", "expected"),
    [(True, True, "bfloat16"), (False, True, "int8"), (False, False, "int8")],
)
def test_the_cpu_default_is_bf16_only_on_amx(
    monkeypatch: pytest.MonkeyPatch, amx: bool, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)

    assert encoder.default_cpu_dtype() == expected
    assert encoder.Encoder(device="cpu").dtype == expected


def test_the_fp32_graph_computes_what_the_model_does() -> None:
    # The ONNX graph's wiring, without quantisation: the same vectors as transformers.
    model = encoder.load_model("cpu", torch.float32)
    graph = quantized.OnnxEncoder(model, encoder.load_tokenizer(), quantize=False)
    batch = encoder.load_tokenizer()(
        TEXTS, padding=True, truncation=True, max_length=encoder.MAX_TOKENS, return_tensors="np"
    )
    hidden = graph.hidden(batch["input_ids"], batch["attention_mask"])
    vectors = encoder._mean_pool(
        torch.from_numpy(hidden), torch.from_numpy(batch["attention_mask"])
    )

    cosine = (vectors * encoder.reference_embed(TEXTS)).sum(axis=1)
    assert cosine.min() > 0.99999, cosine


def test_an_int8_vector_does_not_depend_on_its_batch_mates() -> None:
    # Per-token activation scales: an outlier text in the batch coarsens no one else.
    int8 = _cpu_encoder("int8")
    alone = int8.embed([TEXTS[0]])[0]
    crowded = int8.embed([TEXTS[0], "🔥🔥🔥 " * 20, "!!!!" * 30, TEXTS[5]])[0]

    assert float(alone @ crowded) > 0.99999


def test_similar_posts_are_closer_than_unrelated_ones() -> None:
    delayed, late, pizza = facade.embed(
        ["the flight was delayed again", "my plane is late", "I love pizza with olives"]
    )

    assert float(delayed @ late) > float(delayed @ pizza) + 0.2


def test_an_unknown_device_or_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="device"):
        encoder.Encoder(device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        encoder.Encoder(device="cpu", dtype="int4")
    with pytest.raises(ValueError, match="int8"):
        encoder.Encoder(device="cuda", dtype="int8")


def _rows(texts: Sequence[str]) -> np.ndarray:
    """A stand-in embedding: each text's length in its first column."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    out[:, 0] = [len(t) for t in texts]
    return out


def test_micro_batcher_flushes_a_full_batch_at_once() -> None:
    batcher = MicroBatcherProbe(max_batch=4, max_wait_ms=10_000)
    started = time.monotonic()
    first = batcher.submit(["a", "bb"])
    second = batcher.submit(["ccc", "dddd"])

    assert first.result(timeout=5)[:, 0].tolist() == [1, 2]
    assert second.result(timeout=5)[:, 0].tolist() == [3, 4]
    assert time.monotonic() - started < 5  # not held for max_wait_ms
    assert batcher.batches == [4]
    batcher.close()


def test_micro_batcher_flushes_a_partial_batch_after_the_wait() -> None:
    batcher = MicroBatcherProbe(max_batch=64, max_wait_ms=50)
    started = time.monotonic()

    rows = batcher.submit(["only one"]).result(timeout=5)

    assert time.monotonic() - started >= 0.05
    assert rows[:, 0].tolist() == [8] and batcher.batches == [1]
    batcher.close()


def test_micro_batcher_gathers_concurrent_callers_and_reports_failures() -> None:
    batcher = MicroBatcherProbe(max_batch=100, max_wait_ms=200)
    results: list[list[float]] = []

    def call(text: str) -> None:
        results.append(batcher.embed([text])[:, 0].tolist())

    threads = [threading.Thread(target=call, args=("x" * n,)) for n in range(1, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(results) == [[1], [2], [3], [4], [5]]
    assert batcher.batches == [5]
    batcher.close()

    def broken(texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("device lost")

    failing = encoder.MicroBatcher(broken, max_batch=2, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="device lost"):
        failing.embed(["a"])
    failing.close()
    with pytest.raises(RuntimeError, match="closed"):
        failing.submit(["b"])


class MicroBatcherProbe(encoder.MicroBatcher):
    def __init__(self, **kwargs: float) -> None:
        super().__init__(_rows, **kwargs)  # type: ignore[arg-type]


def test_bench_encoder_reports_rates_ratio_and_cosine(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.json"
    printed = io.StringIO()

    call_command(
        "bench",
        "encoder",
        "--data",
        str(shared_data),
        "--texts",
        "24",
        "--runs",
        "1",
        "--batch-sizes",
        "1,32",
        "--json",
        str(out),
        stdout=printed,
    )

    result = json.loads(out.read_text())
    assert result["texts"] == 24
    assert set(result["reference"]) == {"1", "32"} == set(result["production"])
    assert all(rate > 0 for rate in result["production"].values())
    assert result["ratio_to_reference_at_32"] > 0
    assert result["cosine_to_reference"]["min"] >= 0.98
    assert "x the reference at batch 32" in printed.getvalue()
