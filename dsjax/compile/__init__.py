"""Ahead-of-time compilation for TPU slices and GPU clusters without the hardware:
compile-only devices (topology.py), the real train / prefill / decode steps compiled for them
(steps.py), and the per-device memory, FLOP and collective report (report.py). The CLI is
`python -m dsjax.compile`."""
