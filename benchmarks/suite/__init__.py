"""The GPU results table, measured in two runs that each fit one device session.

    sizes.py        what every stage sizes by: the GPU defaults, and TINY for a CPU smoke run
    stages.py       the stage table: name, run (A or B), time budget, and the function that measures
    environment.py  GPU, driver, versions, which optional packages import
    steps.py        training steps on synthetic views: supervised ceiling, fastbyol model-only
                    variants, step time against per-GPU batch, LARS + EMA share
    loaders.py      photo-like JPEGs, `fastbyol convert`, `fastbyol profile` per backend
    augment.py      the view augmentation, eager against torch.compile
    install.py      the offline wheelhouse and DALI's parts, into a folder of their own
    records.py      results.jsonl: one record per stage, partial ones saved as they are measured
    table.py        the Markdown table and the targets
    runner.py       one process per stage, each killed at its budget, inside the run's deadline

benchmarks/gpu_suite.py is the command; benchmarks/README.md has the device session's plan.
"""
