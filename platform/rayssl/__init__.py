"""rayssl: the Ray + MLflow platform around an SSL method (data streaming, train loop,
launch, sweeps, tracking). The method itself is reached only through rayssl.method."""

__all__ = ["config", "method", "plan", "loop", "checkpoint", "telemetry", "evaluator", "train", "launch", "sweep",
           "tracking"]
