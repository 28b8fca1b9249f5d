"""The plumbing the scripts share, one module per concern; no module here imports a script.

errors (the user errors and a stopped run) · flags (the common flags) · cli (flags -> main, one-line errors) ·
models (loading, log-probs) · rollouts (sampling, generate, vLLM) · cpu_decode (the compiled CPU decode step) ·
runs (run folders, metrics, curves) · checkpoints (save, resume, RNG state) · launch (processes, FSDP, memory plan)
"""
