"""The QKeras VAE on the 57 L1 inputs, its training, and saving it as a model directory.

Encoder (quantization-aware, the part that goes to firmware): 57 -> 32 -> 16 with
``quantized_bits`` weights and ``quantized_relu`` activations, then two linear QDense heads
mu and log sigma^2 (latent 3), concatenated into one output because board backends need a
single output port. Decoder (float, host only): 3 -> 16 -> 32 -> 57.

BatchNorm: none. The inputs are standardised with fixed statistics fitted on the training
background and recorded in the model card (``firmware.inputs``), and each QDense bias
absorbs the shift BN would learn, so there is nothing to fold and QKeras
trains exactly the integer weights the firmware uses (QAT).

Loss: masked MSE over the inputs of real (non-padded) objects + beta x KL(q(z|x) || N(0,1)).

References:
    Govorkova et al., "Autoencoders on field-programmable gate arrays for real-time,
    unsupervised new physics detection at 40 MHz at the Large Hadron Collider",
    Nature Machine Intelligence 4 (2022) 154, arXiv:2108.03986.
"""

from __future__ import annotations

import functools
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from firmware.config import ENCODER_LAYERS, LayerQuantization, QuantizationConfig, VAEConfig
from firmware.inputs import FIXED_SCALING, N_INPUTS, InputScaling
from firmware.model import CARD_FORMAT, DECODER_LAYERS, LOSS_PNG, WEIGHTS_NAME, L1Model, write_card

with warnings.catch_warnings():
    # TensorFlow 2.14 and QKeras touch deprecated ml_dtypes/numpy names while importing;
    # under pytest's filterwarnings=error that would abort the import half-way.
    warnings.simplefilter("ignore", DeprecationWarning)
    import tensorflow as tf
    from qkeras import QActivation, QDense, quantized_bits, quantized_relu

P = ParamSpec("P")
R = TypeVar("R")

INPUT_NAME = "l1_inputs"
OUTPUT_NAME = "mu_logvar"


def _quantizer(layer: LayerQuantization) -> Any:
    return quantized_bits(layer.weight_bits, layer.weight_integer, alpha=1)


def _float_seed_warning_ignored(function: Callable[P, R]) -> Callable[P, R]:
    """Keras and QKeras draw layer seeds with ``random.randint(1, 1e9)``, a float bound that
    Python 3.10+ deprecates (DeprecationWarning); harmless, and only that one is ignored."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="non-integer arguments to randrange", category=DeprecationWarning
            )
            return function(*args, **kwargs)

    return wrapper


@_float_seed_warning_ignored
def build_encoder(vae: VAEConfig, quant: QuantizationConfig) -> tf.keras.Model:
    """The QKeras encoder: (N, 57) -> (N, 2 x latent) = concat(mu, log sigma^2)."""
    inputs = tf.keras.Input((N_INPUTS,), name=INPUT_NAME)
    x = inputs
    for name, width in zip(ENCODER_LAYERS[:2], vae.hidden, strict=True):
        q = quant.layer(name)
        x = QDense(width, kernel_quantizer=_quantizer(q), bias_quantizer=_quantizer(q), name=name)(
            x
        )
        x = QActivation(
            quantized_relu(q.activation_bits, q.activation_integer), name=f"{name}_relu"
        )(x)
    heads = []
    for name in ENCODER_LAYERS[2:]:
        q = quant.layer(name)
        heads.append(
            QDense(
                vae.latent, kernel_quantizer=_quantizer(q), bias_quantizer=_quantizer(q), name=name
            )(x)
        )
    outputs = tf.keras.layers.Concatenate(name=OUTPUT_NAME)(heads)
    return tf.keras.Model(inputs, outputs, name="l1_vae_encoder")


@_float_seed_warning_ignored
def build_decoder(vae: VAEConfig) -> tf.keras.Model:
    """The float decoder: (N, latent) -> (N, 57)."""
    inputs = tf.keras.Input((vae.latent,), name="z")
    x = inputs
    for name, width in zip(DECODER_LAYERS[:2], reversed(vae.hidden), strict=True):
        x = tf.keras.layers.Dense(width, activation="relu", name=name)(x)
    outputs = tf.keras.layers.Dense(N_INPUTS, name=DECODER_LAYERS[2])(x)
    return tf.keras.Model(inputs, outputs, name="l1_vae_decoder")


def _weights_of(encoder: tf.keras.Model, decoder: tf.keras.Model) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for model, names in ((encoder, ENCODER_LAYERS), (decoder, DECODER_LAYERS)):
        for name in names:
            kernel, bias = model.get_layer(name).get_weights()
            out[f"{name}/kernel"] = kernel.astype(np.float32)
            out[f"{name}/bias"] = bias.astype(np.float32)
    return out


def encoder_from_model(model: L1Model) -> tf.keras.Model:
    """Rebuild the QKeras encoder of a model directory with its weights."""
    encoder = build_encoder(model.vae, model.quantization)
    for name in ENCODER_LAYERS:
        layer = encoder.get_layer(name)
        layer.set_weights([model.weights[f"{name}/kernel"], model.weights[f"{name}/bias"]])
    return encoder


@dataclass(frozen=True, slots=True)
class TrainResult:
    encoder: tf.keras.Model
    decoder: tf.keras.Model
    history: dict[str, list[float]]
    elapsed_s: float


@_float_seed_warning_ignored
def train(
    inputs: np.ndarray,
    mask: np.ndarray,
    vae: VAEConfig,
    quant: QuantizationConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the VAE on (N, 57) rounded inputs with their padding mask.

    ``on_epoch(epoch, figures)`` is called after each epoch with the mean train loss, reco
    and KL terms and the validation loss.
    """
    tf.keras.utils.set_random_seed(vae.seed)
    rng = np.random.default_rng(vae.seed)
    order = rng.permutation(len(inputs))
    n_val = int(len(inputs) * vae.validation_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, m_train = inputs[train_idx], mask[train_idx]
    x_val, m_val = inputs[val_idx], mask[val_idx]
    encoder, decoder = build_encoder(vae, quant), build_decoder(vae)
    optimizer = tf.keras.optimizers.Adam(vae.learning_rate)
    beta = tf.constant(vae.beta, tf.float32)
    latent = vae.latent

    def losses(x: tf.Tensor, m: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        out = encoder(x, training=training)
        mu, log_var = out[:, :latent], out[:, latent:]
        z = mu + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mu))
        rec = decoder(z, training=training)
        count = tf.maximum(tf.reduce_sum(m, axis=1), 1.0)
        reco = tf.reduce_sum(m * tf.square(x - rec), axis=1) / count
        kl = 0.5 * tf.reduce_sum(tf.square(mu) + tf.exp(log_var) - 1.0 - log_var, axis=1)
        return tf.reduce_mean(reco), tf.reduce_mean(kl)

    variables = encoder.trainable_variables + decoder.trainable_variables

    @tf.function
    def step(x: tf.Tensor, m: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            reco, kl = losses(x, m, True)
            loss = reco + beta * kl
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return reco, kl

    @tf.function
    def evaluate(x: tf.Tensor, m: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return losses(x, m, False)

    history: dict[str, list[float]] = {"loss": [], "reco": [], "kl": [], "val_loss": []}
    t0 = time.perf_counter()
    for epoch in range(vae.epochs):
        perm = rng.permutation(len(x_train))
        sums = np.zeros(2)
        n_batches = 0
        for start in range(0, len(perm), vae.batch_size):
            idx = perm[start : start + vae.batch_size]
            reco, kl = step(tf.constant(x_train[idx]), tf.constant(m_train[idx]))
            sums += (float(reco), float(kl))
            n_batches += 1
        reco_mean, kl_mean = sums / max(n_batches, 1)
        history["reco"].append(reco_mean)
        history["kl"].append(kl_mean)
        history["loss"].append(reco_mean + vae.beta * kl_mean)
        if n_val:
            val_reco, val_kl = evaluate(tf.constant(x_val), tf.constant(m_val))
            history["val_loss"].append(float(val_reco) + vae.beta * float(val_kl))
        if on_epoch is not None:
            on_epoch(epoch, {k: v[-1] for k, v in history.items() if v})
    return TrainResult(encoder, decoder, history, time.perf_counter() - t0)


def plot_losses(history: dict[str, list[float]], path: Path) -> Path:
    """Write the loss-curve PNG (train and validation total loss, reco and KL terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    epochs = np.arange(1, len(history["loss"]) + 1)
    for key, style in (("loss", "-"), ("val_loss", "--"), ("reco", ":"), ("kl", "-.")):
        if history.get(key):
            ax.plot(epochs, history[key], style, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_model(
    out_dir: str | Path,
    result: TrainResult,
    vae: VAEConfig,
    quant: QuantizationConfig,
    *,
    scaling: InputScaling = FIXED_SCALING,
    data: dict[str, Any],
    metrics: dict[str, Any],
    reproduce: str,
) -> Path:
    """Write weights, loss PNG and the model card into ``out_dir``; returns the directory."""
    import hls4ml
    import qkeras

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / WEIGHTS_NAME, **_weights_of(result.encoder, result.decoder))
    plot_losses(result.history, root / LOSS_PNG)
    card = {
        "format": CARD_FORMAT,
        "architecture": vae.to_dict(),
        "quantization": quant.to_dict(),
        "input_scaling": {
            **scaling.to_card(),
            "rounding": f"then to the firmware input type {quant.input_type}",
        },
        "data": data,
        "training": {
            "epochs": vae.epochs,
            "elapsed_s": round(result.elapsed_s, 2),
            "history": {k: [round(float(v), 6) for v in vs] for k, vs in result.history.items()},
        },
        "metrics": metrics,
        "scores": {
            "r_z": "sum mu^2 / sigma^2, sigma^2 = exp(log sigma^2); host, float64",
            "sum_mu2": "sum mu^2 (AXOL1TL style); host, float64",
            "reco_loss": "masked MSE of the float decoder at z = mu; host",
        },
        "calibration": None,
        "reproduce": reproduce,
        "versions": {
            "tensorflow": tf.__version__,
            "qkeras": getattr(qkeras, "__version__", "unknown"),
            "hls4ml": hls4ml.__version__,
            "python": platform.python_version(),
        },
    }
    write_card(root, json.loads(json.dumps(card, default=float)))
    return root
