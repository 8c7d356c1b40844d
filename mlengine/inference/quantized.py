"""all-MiniLM-L6-v2 as an int8 ONNX Runtime graph: the encoder's production path on a CPU.

The BERT encoder is written out as an ONNX graph from the model's own weights (nothing is
fetched or exported through a tracer) and run by ONNX Runtime's CPU provider. Every
linear layer is an integer matrix product:

- **weights** are quantised once, per output channel, symmetric;
- **activations** are quantised at run time **per token** (one scale per row, from the
  row's largest magnitude), so a text's vector does not depend on its batch mates, and
  one outlier token does not coarsen the whole batch (per-tensor dynamic quantisation,
  ONNX Runtime's ``quantize_dynamic``, moved some tweets to a cosine of 0.957);
- **SmoothQuant** (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training
  Quantization for Large Language Models", ICML) moves the activations' outlier channels
  into the weights: input channel j is divided by ``s_j = max|X_j|^α / max|W_j|^(1-α)``
  and the weights' column j multiplied by it, with α = 0.5. ``max|X_j|`` is calibrated on
  random token sequences (seeded), so no text data is needed at run time.

The attention core (softmax of QKᵀ, times V), the layer norms and GELU stay in fp32
(ONNX Runtime's fused ``MultiHeadAttention``, ``SkipLayerNormalization`` and
``BiasGelu``). On a CPU without VNNI, ONNX Runtime's u8×s8 kernels add pairs of products
in 16 bits (``vpmaddubsw``) and can saturate: there the weights take 7 bits, except the
feed-forward down-projection, whose GELU outputs need 8 and run as u8×u8 (no pairwise
16-bit sums). With VNNI (``vpdpbusd``) every weight takes 8 bits.

Measured (docs/models.md): within a cosine of 0.99 of the fp32 reference on real posts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ALPHA = 0.5
"""SmoothQuant's migration strength α (dimensionless, 0–1)."""
CALIBRATION_BATCHES = 8
"""Batches of 32 random sequences of 40 tokens that calibrate the activation ranges."""


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot products that add into 32 bits (AVX512-VNNI or
    AVX-VNNI), so u8×s8 products cannot saturate."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def activation_ranges(model: Any, tokenizer: Any, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Per input channel, the largest magnitude each linear layer of ``model`` (a
    transformers BERT model in fp32) sees on ``CALIBRATION_BATCHES`` batches of random
    token sequences. Returns ``{module name: (in_features,) float32}``. Deterministic
    for a given ``seed``; runs the model once per batch (about a second on 2 cores)."""
    import torch

    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith("pooler")
    }
    ranges: dict[str, torch.Tensor] = {}

    def record(name: str, inputs: tuple[Any, ...]) -> None:
        seen = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
        ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen

    hooks = [
        module.register_forward_pre_hook(lambda _m, inputs, name=name: record(name, inputs))
        for name, module in linears.items()
    ]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode():
            for _ in range(CALIBRATION_BATCHES):
                ids = torch.randint(1000, tokenizer.vocab_size, (32, 40), generator=generator)
                ids[:, 0] = tokenizer.cls_token_id
                ids[:, -1] = tokenizer.sep_token_id
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: value.float().numpy() for name, value in ranges.items()}


class _Graph:
    """Accumulates ONNX nodes and initialisers."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def constant(self, name: str, value: Any) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        domain = attrs.pop("domain", "")
        self.nodes.append(helper.make_node(op_type, inputs, [output], domain=domain, **attrs))
        return output


def build_graph(
    model: Any,
    tokenizer: Any,
    *,
    quantize: bool = True,
    vnni: bool | None = None,
    alpha: float = ALPHA,
) -> bytes:
    """The ONNX graph (serialised ``ModelProto``) of ``model``, a transformers BERT model
    in fp32, with inputs ``input_ids`` and ``attention_mask`` (batch, tokens) int64 and
    output ``hidden`` (batch, tokens, hidden size) float32: the last hidden state.

    ``quantize``: integer linear layers as in the module docstring (False: fp32, the
    same arithmetic as the model, for tests). ``vnni``: whether the CPU has VNNI
    (default: ``cpu_has_vnni()``); without it the weights take 7 bits. Needs the
    ``onnx`` package. Takes about two seconds (the calibration run).
    """
    from onnx import TensorProto, helper

    vnni = cpu_has_vnni() if vnni is None else vnni
    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    config = model.config
    hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
    ranges = activation_ranges(model, tokenizer) if quantize else {}
    g = _Graph()
    g.constant("axes0", np.array([0], np.int64))
    g.constant("axes1", np.array([1], np.int64))
    g.constant("inv127", np.float32(1 / 127))
    g.constant("tiny", np.float32(1e-8))
    g.constant("one", np.float32(1.0))
    g.constant("zp128", np.uint8(128))

    def linear(x: str, modules: list[str], out: str, *, eight_bit: bool = False) -> tuple[str, Any]:
        """x (tokens, in) → (tokens, out) without the bias, which is returned to be fused
        into the next operator. ``modules`` are concatenated on the output axis."""
        w = np.concatenate([weights[m + ".weight"] for m in modules])  # (out, in)
        bias = np.concatenate([weights[m + ".bias"] for m in modules])
        if not quantize:
            return g.op("MatMul", [x, g.constant(out + ".w", w.T)], out), bias
        smooth = ranges[modules[0]].clip(1e-5) ** alpha / np.abs(w).max(0).clip(1e-5) ** (1 - alpha)
        smooth = smooth.clip(1e-5).astype(np.float32)
        w = w * smooth[None, :]
        unsigned = eight_bit and not vnni
        qmax = 127 if (vnni or eight_bit) else 63
        w_scale = (np.abs(w).max(1).clip(1e-12) / qmax).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None]), -qmax, qmax).T  # (in, out)
        w_q = (w_q + 128).astype(np.uint8) if unsigned else w_q.astype(np.int8)
        scaled = g.op("Mul", [x, g.constant(out + ".smooth", 1 / smooth)], out + ".x")
        peak = g.op(
            "ReduceMax", [g.op("Abs", [scaled], out + ".abs")], out + ".peak", axes=[1], keepdims=0
        )
        scale = g.op("Max", [g.op("Mul", [peak, "inv127"], out + ".s0"), "tiny"], out + ".s")
        x_q = g.op("QuantizeLinear", [scaled, scale, "token_zp"], out + ".q", axis=0)
        inputs = [
            x_q,
            g.constant(out + ".wq", w_q),
            "one",
            g.constant(out + ".ws", w_scale),
            "zp128",
        ]
        y = g.op(
            "MatMulIntegerToFloat",
            inputs + (["zp128"] if unsigned else []),
            out + ".y",
            domain="com.microsoft",
        )
        row_scale = g.op("Unsqueeze", [scale, "axes1"], out + ".rs")
        return g.op("Mul", [y, row_scale], out), bias

    def add_and_norm(y: str, residual: str, bias: Any, norm: str, out: str) -> str:
        """LayerNorm(y + bias + residual) with the weights of module ``norm``."""
        inputs = [y, residual, g.constant(out + ".g", weights[norm + ".weight"])]
        inputs += [g.constant(out + ".b", weights[norm + ".bias"]), g.constant(out + ".bias", bias)]
        return g.op("SkipLayerNormalization", inputs, out, domain="com.microsoft", epsilon=eps)

    # Embeddings: word + position (+ token type 0, folded into the position table).
    length = g.op(
        "Gather", [g.op("Shape", ["input_ids"], "ids_shape"), g.constant("i1", np.int64(1))], "len"
    )
    length1 = g.op("Unsqueeze", [length, "axes0"], "len1")
    positions = (
        weights["embeddings.position_embeddings.weight"]
        + weights["embeddings.token_type_embeddings.weight"][0]
    )
    position = g.op(
        "Slice",
        [
            g.constant("positions", positions),
            g.constant("start", np.array([0], np.int64)),
            length1,
            "axes0",
        ],
        "pos",
    )
    word = g.op(
        "Gather",
        [g.constant("words", weights["embeddings.word_embeddings.weight"]), "input_ids"],
        "word",
    )
    x = g.op(
        "LayerNormalization",
        [
            g.op("Add", [word, position], "emb"),
            g.constant("emb.g", weights["embeddings.LayerNorm.weight"]),
            g.constant("emb.b", weights["embeddings.LayerNorm.bias"]),
        ],
        "x0.3d",
        axis=-1,
        epsilon=eps,
    )
    x = g.op("Reshape", [x, g.constant("shape2d", np.array([-1, hidden], np.int64))], "x0")
    shape3d = g.op(
        "Concat",
        [
            g.constant("minus1", np.array([-1], np.int64)),
            length1,
            g.constant("width", np.array([hidden], np.int64)),
        ],
        "shape3d",
        axis=0,
    )
    mask = g.op("Cast", ["attention_mask"], "mask32", to=TensorProto.INT32)
    if quantize:
        g.op("Expand", ["zp128", g.op("Shape", [x], "rows", start=0, end=1)], "token_zp")
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv, qkv_bias = linear(
            x,
            [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"],
            f"l{i}.qkv",
        )
        qkv = g.op("Add", [qkv, g.constant(f"l{i}.qkv.b", qkv_bias)], f"l{i}.qkvb")
        g.nodes.append(
            helper.make_node(
                "Split",
                [qkv, g.constant(f"l{i}.split", np.array([hidden] * 3, np.int64))],
                [f"l{i}.q", f"l{i}.k", f"l{i}.v"],
                axis=1,
            )
        )
        q, k, v = (g.op("Reshape", [f"l{i}.{n}", shape3d], f"l{i}.{n}3") for n in "qkv")
        context = g.op(
            "MultiHeadAttention",
            [q, k, v, "", mask],
            f"l{i}.ctx3",
            domain="com.microsoft",
            num_heads=heads,
        )
        context = g.op("Reshape", [context, "shape2d"], f"l{i}.ctx")
        attn, attn_bias = linear(context, [p + "attention.output.dense"], f"l{i}.ao")
        x = add_and_norm(attn, x, attn_bias, p + "attention.output.LayerNorm", f"l{i}.x1")
        up, up_bias = linear(x, [p + "intermediate.dense"], f"l{i}.up")
        gelu = g.op(
            "BiasGelu",
            [up, g.constant(f"l{i}.up.b", up_bias)],
            f"l{i}.gelu",
            domain="com.microsoft",
        )
        down, down_bias = linear(gelu, [p + "output.dense"], f"l{i}.down", eight_bit=True)
        x = add_and_norm(down, x, down_bias, p + "output.LayerNorm", f"l{i}.x2")
    g.op("Reshape", [x, shape3d], "hidden")
    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", hidden])],
        g.initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


class OnnxEncoder:
    """An ONNX Runtime session of ``build_graph(model, tokenizer, ...)`` on the CPU.

    ``threads``: intra-op threads (default: torch's, which follows the cores this process
    may use). The torch model is not kept: only the session's int8 weights (about 60 MB
    with the fp32 token embeddings).
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, quantize: bool = True, threads: int | None = None
    ) -> None:
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads() or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            build_graph(model, tokenizer, quantize=quantize),
            options,
            providers=["CPUExecutionProvider"],
        )

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The last hidden state, (batch, tokens, 384) float32, of int64 ``input_ids`` and
        ``attention_mask`` of shape (batch, tokens)."""
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        return self._session.run(["hidden"], feeds)[0]
