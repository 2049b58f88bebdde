"""The ZeRO paper's model-state memory per rank, the prediction measured memory is plotted against."""

# Bytes per parameter of (parameters, gradients, Adam optimizer states) -- Rajbhandari et al. 2020, section 3:
# mixed precision keeps 2-byte params and grads plus K=12 bytes of fp32 master copy, momentum and variance.
BYTES = {"fp32": (4.0, 4.0, 8.0), "bf16": (2.0, 2.0, 12.0), "fp16": (2.0, 2.0, 12.0)}


def zero_model_state_bytes(params: int, stage: int, workers: int, precision: str = "fp32") -> float:
    """Model states one rank holds under ZeRO `stage` (0 = plain data parallel) with `workers` ranks."""
    p, g, o = (b * params for b in BYTES[precision])
    if stage >= 1:
        o /= workers
    if stage >= 2:
        g /= workers
    if stage >= 3:
        p /= workers
    return p + g + o
