"""Configs of the L1 VAE: architecture and training, per-layer quantization, fixed-point types.

Everything here is plain data (no TensorFlow), recorded verbatim in the model card so a
model directory says exactly which bit widths its firmware uses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, field
from typing import Annotated, Any

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, model_validator

_FIXED = re.compile(r"^ap_(u?)fixed<\s*(\d+)\s*,\s*(-?\d+)\s*(?:,\s*(\w+)\s*)?(?:,\s*(\w+)\s*)?>$")


_CONFIG = ConfigDict(extra="forbid")
_Size = Annotated[int, Field(ge=1)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_CONFIG)
class FixedType:
    """An ``ap_fixed<width, integer, rounding, saturation>`` type (``integer`` counts the sign).

    Example:
        >>> FixedType.parse("ap_fixed<16,7,AP_RND_CONV,AP_SAT>").lsb
        0.001953125
    """

    width: Annotated[int, Field(ge=1)]
    integer: int
    signed: bool = True
    rounding: str = "AP_TRN"
    saturation: str = "AP_WRAP"

    @model_validator(mode="after")
    def _integer_fits(self) -> FixedType:
        if self.integer > self.width:
            msg = f"bad fixed-point type: width {self.width}, integer {self.integer}"
            raise ValueError(msg)
        return self

    @classmethod
    def parse(cls, text: str) -> FixedType:
        """Parse ``ap_fixed<W,I[,Q[,O]]>`` or ``ap_ufixed<...>``."""
        match = _FIXED.match(text.strip())
        if match is None:
            msg = f"not an ap_fixed type: {text!r}"
            raise ValueError(msg)
        unsigned, width, integer, rounding, saturation = match.groups()
        return cls(
            width=int(width),
            integer=int(integer),
            signed=not unsigned,
            rounding=rounding or "AP_TRN",
            saturation=saturation or "AP_WRAP",
        )

    @property
    def lsb(self) -> float:
        """Value of the least significant bit."""
        return 2.0 ** (self.integer - self.width)

    @property
    def max(self) -> float:
        """Largest representable value."""
        top = self.integer - 1 if self.signed else self.integer
        return 2.0**top - self.lsb

    @property
    def min(self) -> float:
        """Smallest representable value."""
        return -(2.0 ** (self.integer - 1)) if self.signed else 0.0

    def __str__(self) -> str:
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        extra = ""
        if self.rounding != "AP_TRN" or self.saturation != "AP_WRAP":
            extra = f",{self.rounding},{self.saturation}"
        return f"{kind}<{self.width},{self.integer}{extra}>"


def _fixed_type(text: str) -> str:
    """``text`` if it parses as an ``ap_fixed`` type (``FixedType.parse``)."""
    FixedType.parse(text)
    return text


#: An ``ap_fixed<...>`` type as hls4ml writes it.
FixedTypeText = Annotated[str, AfterValidator(_fixed_type)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_CONFIG)
class LayerQuantization:
    """One encoder Dense layer: QKeras quantizers for training, hls4ml types for firmware.

    ``weight_bits``/``weight_integer`` give ``quantized_bits(bits, integer, alpha=1)`` for
    kernel and bias (``integer`` excludes the sign, as in QKeras). ``activation_bits`` 0
    means a linear output (the latent heads); otherwise ``quantized_relu(bits, integer)``.
    ``accum`` and ``result`` are the firmware's accumulator and output types, wide enough
    that the sums are exact (so the emulator equals QKeras bit for bit).
    """

    weight_bits: Annotated[int, Field(ge=2, le=32)] = 8
    weight_integer: Annotated[int, Field(ge=0)] = 3
    activation_bits: int = 8
    activation_integer: int = 3
    accum: FixedTypeText = "ap_fixed<32,16>"
    result: FixedTypeText = "ap_fixed<32,16>"

    @model_validator(mode="after")
    def _integers_fit(self) -> LayerQuantization:
        if self.weight_integer >= self.weight_bits:
            msg = f"bad weight quantizer ({self.weight_bits}, {self.weight_integer})"
            raise ValueError(msg)
        if self.activation_bits and not 0 <= self.activation_integer <= self.activation_bits:
            msg = f"bad activation quantizer ({self.activation_bits}, {self.activation_integer})"
            raise ValueError(msg)
        return self

    @property
    def weight_type(self) -> FixedType:
        """The firmware type of the quantized weights (QKeras integer + sign bit)."""
        return FixedType(width=self.weight_bits, integer=self.weight_integer + 1)

    @property
    def activation_type(self) -> FixedType | None:
        """The firmware type of the quantized ReLU output (unsigned, convergent, saturating)."""
        if not self.activation_bits:
            return None
        return FixedType(
            width=self.activation_bits,
            integer=self.activation_integer,
            signed=False,
            rounding="AP_RND_CONV",
            saturation="AP_SAT",
        )


def _hidden() -> LayerQuantization:
    return LayerQuantization()


def _head() -> LayerQuantization:
    return LayerQuantization(activation_bits=0, accum="ap_fixed<24,12>", result="ap_fixed<24,12>")


#: Encoder layer names, in order; the firmware keeps them.
ENCODER_LAYERS = ("enc_dense1", "enc_dense2", "z_mean", "z_log_var")


def _linear(layer: LayerQuantization) -> LayerQuantization:
    """``layer`` if it has no activation (the latent heads)."""
    if layer.activation_bits:
        raise ValueError("must be linear (activation_bits=0)")
    return layer


_LinearLayer = Annotated[LayerQuantization, AfterValidator(_linear)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_CONFIG)
class QuantizationConfig:
    """Per-layer quantization of the encoder and the firmware's input and output types.

    The input type rounds convergently and saturates, so host-side rounding
    (``firmware.inputs.round_to_fixed``) reproduces it exactly. ``output`` is the type of
    the concatenated (mu, log sigma^2) vector; 24 bits convert to float32 without loss.
    """

    input_type: FixedTypeText = "ap_fixed<16,7,AP_RND_CONV,AP_SAT>"
    enc_dense1: LayerQuantization = field(default_factory=_hidden)
    enc_dense2: LayerQuantization = field(
        default_factory=lambda: LayerQuantization(accum="ap_fixed<24,12>", result="ap_fixed<24,12>")
    )
    z_mean: _LinearLayer = field(default_factory=_head)
    z_log_var: _LinearLayer = field(default_factory=_head)
    output: FixedTypeText = "ap_fixed<24,12>"

    @property
    def input_fixed(self) -> FixedType:
        return FixedType.parse(self.input_type)

    def layer(self, name: str) -> LayerQuantization:
        """The quantization of the encoder layer ``name``."""
        if name not in ENCODER_LAYERS:
            msg = f"no encoder layer {name!r}; layers are {ENCODER_LAYERS}"
            raise KeyError(msg)
        result: LayerQuantization = getattr(self, name)
        return result

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=_CONFIG)
class VAEConfig:
    """Architecture and training of the L1 VAE (Govorkova et al., Nature MI 2022, dense VAE).

    Encoder 57 -> ``hidden[0]`` -> ``hidden[1]`` -> (mu, log sigma^2) of size ``latent``;
    decoder ``hidden[1]`` -> ``hidden[0]`` -> 57. Loss: MSE over the non-padded objects
    plus ``beta`` x KL divergence to N(0, 1).
    """

    hidden: tuple[_Size, _Size] = (32, 16)
    latent: _Size = 3
    beta: Annotated[float, Field(ge=0)] = 0.01
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    epochs: _Size = 60
    batch_size: _Size = 256
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    seed: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
