"""The GPU results table, measured in two runs that each fit one device session.

    stages.py       the stage table: name, run (A or B), time budget, and the function that measures
    sizes.py        what every stage sizes by: the GPU defaults, and TINY for a CPU smoke run
    context.py      what a stage function is given (sizes, device, folders, save)
    environment.py  GPU, driver, versions, which optional packages import
    ceiling.py      the supervised ResNet step: the bar fastbyol's step is read against
    model.py        fastbyol's model-only step: variants, peers, step time against per-GPU batch,
                    DDP over one rank, the compiled variants
    fused.py        LARS + EMA against the step; one LARS step's ops and kernels
    loaders.py      photo-like JPEGs, `fastbyol convert`, `fastbyol profile` per backend
    augment.py      the view augmentation eager against torch.compile (benchmarks/augment_compile.py)
    install.py      the offline wheelhouse and DALI's parts, into a folder of their own
    records.py      results.jsonl: every figure saved as it is measured; the newest line of a stage wins
    table.py        the Markdown table and the targets
    runner.py       one process per stage, each killed at its budget, inside the run's deadline

benchmarks/gpu_suite.py is the command; benchmarks/README.md has the device session's plan.
"""
