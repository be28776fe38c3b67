"""fastbyol's benchmarks, run as modules from the repository root (no sys.path edits):

    python -m benchmarks.gpu_suite run A --out results/A    # the GPU results table (suite/)
    python -m benchmarks.peers --device cuda --batch 256     # fastbyol vs lightly vs byol-pytorch
    python -m benchmarks.fused_ops --device cuda             # foreach LARS / EMA vs per-parameter loops

benchmarks/README.md says what each measures and the GPU session's exact commands.
"""
