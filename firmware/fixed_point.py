"""Exact integer emulation of an hls4ml io_parallel dense network, vectorised over the batch.

hls4ml's C++ spends most of its time in software ``ap_fixed`` arithmetic. Here every value
is an int64 count of its type's least significant bit, and each ``ap_fixed`` assignment is
replayed exactly: rounding (``AP_TRN``, ``AP_TRN_ZERO``, ``AP_RND``, ``AP_RND_ZERO``,
``AP_RND_MIN_INF``, ``AP_RND_INF``, ``AP_RND_CONV``) then overflow (``AP_WRAP``, ``AP_SAT``,
``AP_SAT_ZERO``, ``AP_SAT_SYM``). The network, every type and every weight are read from
the project hls4ml wrote (``defines.h``, ``parameters.h``, ``weights/*.h`` and the top
function's layer calls), so nothing is specific to one model; a layer or mode it does not
know is refused with a clear error rather than approximated.

Dense layers follow ``nnet::dense_latency``: each product ``data * weight`` (full
precision) is assigned to ``accum_t``, the bias is assigned to ``accum_t``, products are
added in input order with ``accum_t`` overflow after each addition, and the sum is
assigned to the result type. When products fit ``accum_t`` without rounding and it wraps,
the sum is one matrix product (float64 BLAS when every partial sum stays below 2**53,
otherwise int64), wrapped once: wrapping is modular, so that is the same number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware.config import FixedType

ROUNDING = (
    "AP_TRN",
    "AP_TRN_ZERO",
    "AP_RND",
    "AP_RND_ZERO",
    "AP_RND_MIN_INF",
    "AP_RND_INF",
    "AP_RND_CONV",
)
OVERFLOW = ("AP_WRAP", "AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM")
_EXACT_FLOAT = 2.0**53

_TYPEDEF = re.compile(r"typedef\s+(ap_u?fixed<[^;]*>)\s+(\w+)\s*;")
_STRUCT = re.compile(r"struct\s+(\w+)\s*:\s*nnet::\w+\s*\{(.*?)\n\};", re.S)
_CALL = re.compile(r"nnet::(\w+)<([^>]*(?:<[^>]*>[^>]*)*)>\s*\(([^)]*)\)\s*;")
_ARRAY = re.compile(r"(\w+)\s+(\w+)\[(\d+)\]\s*=\s*\{([^}]*)\}\s*;")


def fixed_type(text: str) -> FixedType:
    """Parse an ``ap_[u]fixed<W,I[,Q[,O[,N]]]>`` as hls4ml writes it (N saturation bits 0)."""
    args = [a.strip() for a in text[text.index("<") + 1 : text.rindex(">")].split(",")]
    if len(args) == 5:
        if args[4] != "0":
            msg = f"{text}: saturation bits N={args[4]} are not emulated"
            raise ValueError(msg)
        args = args[:4]
    fixed = FixedType.parse(f"{text[: text.index('<')]}<{','.join(args)}>")
    if fixed.rounding not in ROUNDING or fixed.saturation not in OVERFLOW:
        msg = f"{text}: mode {fixed.rounding}/{fixed.saturation} is not emulated"
        raise ValueError(msg)
    if fixed.width > 48:
        msg = f"{text}: wider than 48 bits; int64 products could overflow"
        raise ValueError(msg)
    return fixed


def frac_bits(t: FixedType) -> int:
    """Fraction bits of ``t`` (may be negative)."""
    return t.width - t.integer


def _round_shift(raw: np.ndarray, shift: int, mode: str) -> np.ndarray:
    """``raw / 2**shift`` rounded to an integer by ``mode`` (shift > 0, exact int64)."""
    floor = raw >> shift
    rest = raw - (floor << shift)  # in [0, 2**shift)
    if mode == "AP_TRN":
        return floor
    if mode == "AP_TRN_ZERO":
        return floor + ((rest != 0) & (raw < 0))
    half = np.int64(1) << (shift - 1)
    above, tie = rest > half, rest == half
    if mode == "AP_RND":
        up = tie
    elif mode == "AP_RND_MIN_INF":
        up = np.zeros_like(tie)
    elif mode == "AP_RND_ZERO":
        up = tie & (raw < 0)
    elif mode == "AP_RND_INF":
        up = tie & (raw > 0)
    else:  # AP_RND_CONV: ties to even
        up = tie & ((floor & 1) == 1)
    return floor + (above | up)


def _overflow(raw: np.ndarray, t: FixedType) -> np.ndarray:
    """Apply ``t``'s overflow mode to integers already on ``t``'s grid."""
    if t.signed:
        lo, hi = -(1 << (t.width - 1)), (1 << (t.width - 1)) - 1
    else:
        lo, hi = 0, (1 << t.width) - 1
    if t.saturation == "AP_SAT_SYM" and t.signed:
        lo = -hi
    if raw.size == 0 or (raw.min() >= lo and raw.max() <= hi):
        return raw  # the common case: nothing overflows
    if t.saturation == "AP_WRAP":
        wrapped = raw & ((1 << t.width) - 1)
        if t.signed:
            wrapped = np.where(wrapped > hi, wrapped - (1 << t.width), wrapped)
        return wrapped
    if t.saturation == "AP_SAT_ZERO":
        return np.where((raw < lo) | (raw > hi), 0, raw)
    return np.clip(raw, lo, hi)


def convert(raw: np.ndarray, frac: int, t: FixedType) -> np.ndarray:
    """Assign integers counting ``2**-frac`` to type ``t``: its raw int64 values."""
    shift = frac - frac_bits(t)
    raw = np.asarray(raw, np.int64)
    if shift > 0:
        raw = _round_shift(raw, shift, t.rounding)
    elif shift < 0:
        raw = raw << -shift
    return _overflow(raw, t)


def quantize(values: np.ndarray, t: FixedType) -> np.ndarray:
    """Assign floats (exact binary values, e.g. float32 inputs or C++ literals) to ``t``."""
    scaled = np.asarray(values, np.float64) * 2.0 ** frac_bits(t)  # exact: a power of two
    if not np.isfinite(scaled).all():
        raise ValueError("non-finite value cannot be converted to a fixed-point type")
    mode = t.rounding
    if mode == "AP_TRN":
        steps = np.floor(scaled)
    elif mode == "AP_TRN_ZERO":
        steps = np.trunc(scaled)
    elif mode == "AP_RND_CONV":
        steps = np.rint(scaled)
    elif mode == "AP_RND":
        steps = np.floor(scaled + 0.5)
    elif mode == "AP_RND_MIN_INF":
        steps = np.ceil(scaled - 0.5)
    elif mode == "AP_RND_ZERO":
        steps = np.where(scaled > 0, np.ceil(scaled - 0.5), np.floor(scaled + 0.5))
    else:  # AP_RND_INF
        steps = np.where(scaled > 0, np.floor(scaled + 0.5), np.ceil(scaled - 0.5))
    if t.saturation == "AP_WRAP":
        steps = np.fmod(steps, 2.0**t.width)  # exact; keeps huge values inside int64
    else:
        steps = np.clip(steps, -(2.0**t.width), 2.0**t.width)  # still out of range
    return _overflow(steps.astype(np.int64), t)


@dataclass(frozen=True)
class Dense:
    """``nnet::dense`` (latency): ``out = result(bias + sum_i data_i * weight_ij)``."""

    source: str
    target: str
    data: FixedType
    weight: FixedType
    bias: FixedType
    accum: FixedType
    result: FixedType
    weights: np.ndarray  # (n_in, n_out) raw int64 of ``weight``
    biases: np.ndarray  # (n_out,) raw int64 of ``bias``

    def __call__(self, x: np.ndarray) -> np.ndarray:
        product_frac = frac_bits(self.data) + frac_bits(self.weight)
        fa = frac_bits(self.accum)
        acc = convert(self.biases, frac_bits(self.bias), self.accum)
        if fa >= product_frac and self.accum.saturation == "AP_WRAP":
            scale = np.int64(1) << (fa - product_frac)
            bound = int(np.abs(x).max(initial=0)) * int(np.abs(self.weights).sum(axis=0).max())
            if bound * int(scale) + int(np.abs(acc).max()) < _EXACT_FLOAT:
                total = (x.astype(np.float64) @ self.weights.astype(np.float64)).astype(np.int64)
            else:
                total = x @ self.weights
            return convert(_overflow(total * scale + acc, self.accum), fa, self.result)
        # General case: products rounded into accum_t, saturating adds in input order.
        acc = np.broadcast_to(acc, (len(x), len(acc)))
        for i in range(self.weights.shape[0]):
            product = convert(x[:, i, None] * self.weights[i], product_frac, self.accum)
            acc = _overflow(acc + product, self.accum)
        return convert(acc, fa, self.result)


@dataclass(frozen=True)
class Relu:
    """``nnet::relu``: ``out = x > 0 ? result(x) : 0``."""

    source: str
    target: str
    data: FixedType
    result: FixedType

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return convert(np.maximum(x, 0), frac_bits(self.data), self.result)


@dataclass(frozen=True)
class Concatenate:
    """``nnet::concatenate1d``: both inputs assigned to the result type, side by side."""

    sources: tuple[str, str]
    target: str
    data: tuple[FixedType, FixedType]
    result: FixedType

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                convert(a, frac_bits(self.data[0]), self.result),
                convert(b, frac_bits(self.data[1]), self.result),
            ],
            axis=1,
        )


Layer = Dense | Relu | Concatenate


@dataclass(frozen=True)
class IntegerNetwork:
    """The whole top function: float inputs -> input type -> layers -> float32 outputs."""

    input_name: str
    input_type: FixedType
    output_name: str
    output_type: FixedType
    n_inputs: int
    layers: tuple[Layer, ...]

    @property
    def n_outputs(self) -> int:
        """Width of the output vector."""
        widths = {self.input_name: self.n_inputs}
        for layer in self.layers:
            if isinstance(layer, Dense):
                widths[layer.target] = layer.weights.shape[1]
            elif isinstance(layer, Relu):
                widths[layer.target] = widths[layer.source]
            else:
                widths[layer.target] = sum(widths[s] for s in layer.sources)
        return widths[self.output_name]

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """(N, n_inputs) floats -> (N, n_outputs) float32, bit-identical to the C++."""
        x = np.asarray(inputs, np.float32).reshape(-1, self.n_inputs)
        values = {self.input_name: quantize(x, self.input_type)}
        for layer in self.layers:
            if isinstance(layer, Concatenate):
                out = layer(values[layer.sources[0]], values[layer.sources[1]])
            else:
                out = layer(values[layer.source])
            values[layer.target] = out
        raw = values[self.output_name]
        # Exact in float64 (<= 48 bits), then one correct rounding to float32, as to_float().
        return (raw * 2.0 ** -frac_bits(self.output_type)).astype(np.float32)


def _config_field(body: str, name: str, struct: str) -> str:
    match = re.search(rf"(?:typedef\s+(\w+)\s+{name}\b|\b{name}\s*=\s*([\w:]+))", body)
    if match is None:
        msg = f"{struct} has no {name}"
        raise ValueError(msg)
    return match.group(1) or match.group(2)


def _array(firmware: Path, name: str) -> np.ndarray:
    text = (firmware / "weights" / f"{name}.h").read_text()
    match = _ARRAY.search(text)
    if match is None or match.group(2) != name:
        msg = f"cannot read array {name} from weights/{name}.h"
        raise ValueError(msg)
    values = np.array([float(v) for v in match.group(4).split(",") if v.strip()], np.float64)
    if len(values) != int(match.group(3)):
        msg = f"weights/{name}.h: {len(values)} values for [{match.group(3)}]"
        raise ValueError(msg)
    return values


def load_network(project_dir: str | Path, project: str) -> IntegerNetwork:
    """Read the network hls4ml wrote in ``project_dir`` for top function ``project``."""
    firmware = Path(project_dir) / "firmware"
    types_text = (firmware / "defines.h").read_text()
    types = {name: text for text, name in _TYPEDEF.findall(types_text)}
    configs = dict(_STRUCT.findall((firmware / "parameters.h").read_text()))
    top = (firmware / f"{project}.cpp").read_text()
    port = re.search(
        rf"void\s+{re.escape(project)}\s*\(\s*(\w+)\s+(\w+)\[(\d+)\]\s*,"
        rf"\s*(\w+)\s+(\w+)\[(\d+)\]\s*\)",
        top,
    )
    if port is None:
        msg = f"cannot find the top function {project}() in {project}.cpp"
        raise ValueError(msg)
    in_t, in_name, n_in, out_t, out_name, _ = port.groups()

    def typ(name: str) -> FixedType:
        if name not in types:
            msg = f"type {name} is not an ap_fixed typedef in defines.h"
            raise ValueError(msg)
        return fixed_type(types[name])

    layers: list[Layer] = []
    for function, template, call in _CALL.findall(top):
        targs = [a.strip() for a in template.split(",")]
        args = [a.strip() for a in call.split(",")]
        if function == "dense":
            data_t, res_t, config = targs
            body = configs.get(config)
            if body is None:
                msg = f"no struct {config} in parameters.h"
                raise ValueError(msg)
            kernel = _config_field(body, "kernel", config)
            product = _config_field(body, "product", config)
            if not kernel.endswith("DenseLatency") or not product.endswith("product::mult"):
                msg = (
                    f"{config}: kernel {kernel}/product {product} not emulated (need latency, mult)"
                )
                raise ValueError(msg)
            n = {k: int(_config_field(body, k, config)) for k in ("n_in", "n_out")}
            weight_t = typ(_config_field(body, "weight_t", config))
            bias_t = typ(_config_field(body, "bias_t", config))
            weights = quantize(_array(firmware, args[2]), weight_t)
            layers.append(
                Dense(
                    args[0],
                    args[1],
                    typ(data_t),
                    weight_t,
                    bias_t,
                    typ(_config_field(body, "accum_t", config)),
                    typ(res_t),
                    weights.reshape(n["n_in"], n["n_out"]),
                    quantize(_array(firmware, args[3]), bias_t),
                )
            )
        elif function == "relu":
            layers.append(Relu(args[0], args[1], typ(targs[0]), typ(targs[1])))
        elif function == "concatenate1d":
            layers.append(
                Concatenate(
                    (args[0], args[1]), args[2], (typ(targs[0]), typ(targs[1])), typ(targs[2])
                )
            )
        else:
            msg = f"layer nnet::{function} of {project}() is not emulated by the integer kernel"
            raise ValueError(msg)
    if not layers or layers[-1].target != out_name:
        msg = f"the layers of {project}() do not end in its output {out_name}"
        raise ValueError(msg)
    return IntegerNetwork(in_name, typ(in_t), out_name, typ(out_t), int(n_in), tuple(layers))
