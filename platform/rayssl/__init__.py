"""rayssl: the Ray + MLflow platform around an SSL method (data streaming, train loop,
trainer, sweeps, tracking). The method itself is reached only through rayssl.method."""

__all__ = ["config", "method", "tracking", "train", "trainer", "sweep"]
