"""The scaling model against what can be measured here: gloo step time for N CPU processes.

    python benchmarks/scaling_check.py --nproc 2,4 --rounds 5

Under torchrun, N processes of one thread each, three variants of a small BYOL (per-view SyncBN,
concat_views SyncBN, no SyncBN). Every round, interleaved so that the load of a shared machine
touches everything alike, for each variant:
  1. compute: one training step of a copy of the model with plain BatchNorm and no DDP, at the
     per-rank batch (what the step costs without any collective);
  2. the real step: DDP + CPUSyncBatchNorm (build_components, train_step), its collectives
     recorded by comm_inventory.CollectiveRecorder;
and once: this machine's loopback, gloo all-reduces of 8 B and 16 MiB -> latency a, bandwidth B.
The model for round r: scaling_model.step_time with cost(S) = a + S / B (bytes as
CPUSyncBatchNorm sends them), the round's compute and the step's recorded collectives.

On an oversubscribed machine each collective also waits for the other ranks to be scheduled,
which a probe run right after a barrier does not see. That cost per collective is fitted on the
concat variant ((measured - model) / collectives, median over rounds) and then predicts the
per-view and the no-SyncBN variants: the check of the model's structure (what is on the critical
path, how many collectives, what DDP hides). Reported: medians over rounds with their min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import comm_inventory  # noqa: E402
import scaling_model  # noqa: E402

MODEL = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=512", "byol.proj_dim=128",
         "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
         "model.channels_last=false", "data.backend=synthetic"]
SMALL, LARGE = 8, 16 * 2**20  # loopback probe sizes, bytes


def _timed(fn) -> float:
    tdist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _loopback(repeats: int = 5) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of a gloo all-reduce between these processes, medians."""
    small, large = torch.zeros(SMALL // 4), torch.zeros(LARGE // 4)
    t_small = statistics.median(_timed(lambda: tdist.all_reduce(small)) for _ in range(repeats))
    t_large = statistics.median(_timed(lambda: tdist.all_reduce(large)) for _ in range(max(2, repeats // 2)))
    return t_small, (LARGE - SMALL) / max(t_large - t_small, 1e-9)


VARIANTS = {"per_view": [], "concat": ["byol.concat_views=true"], "no_sync_bn": ["dist.sync_bn=false"]}


def _worker(rounds: int, per_rank: int, out: Path) -> None:
    from fastbyol import dist
    from fastbyol.config import load_config
    from fastbyol.step import build_components, train_step

    torch.set_num_threads(1)
    info, device = dist.init("cpu")
    recorder = comm_inventory.CollectiveRecorder()
    pairs = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(None, [*MODEL, *extra, f"data.batch_size={per_rank * info.world_size}"],
                          world_size=info.world_size)
        alone = build_components(cfg, device, dist.DistInfo(), peak_lr=0.1)  # plain BN, no DDP: compute only
        with recorder:  # DDP's comm hook is registered at construction
            shared = build_components(cfg, device, info, peak_lr=0.1)
        pairs[name] = (alone, shared)
    g = torch.Generator().manual_seed(info.rank)
    views = [torch.randn(per_rank, 3, 16, 16, generator=g) for _ in range(2)]
    for alone, shared in pairs.values():  # warm-up: optimizer state, DDP's bucket rebuild
        for c in (alone, shared, alone, shared):
            train_step(c, *views, 0.1, 0.99)
    rows, steps = [], {}
    for _ in range(rounds):
        row = {}
        for name, (alone, shared) in pairs.items():
            row[f"{name}_compute"] = _timed(lambda: train_step(alone, *views, 0.1, 0.99))
            tdist.barrier()
            with recorder:
                recorder.mark()
                start = time.perf_counter()
                train_step(shared, *views, 0.1, 0.99)
                row[f"{name}_step"] = time.perf_counter() - start
                recorder.mark()
            steps[name] = comm_inventory.summarize(recorder.segment(len(recorder.marks) - 1))
        row["latency"], row["bandwidth"] = _loopback()
        rows.append(row)
    every = dist.all_gather_object(rows)
    if info.is_main:  # per round: the slowest rank's times (the step waits for it), rank 0's probes
        merged = [{k: max(e[r][k] for e in every) if k.endswith(("_compute", "_step")) else v
                   for k, v in rows[r].items()} for r in range(rounds)]
        out.write_text(json.dumps({"world": info.world_size, "per_rank": per_rank, "rounds": merged, "steps": steps}))
    dist.shutdown()


def predict(result: dict, name: str, sync_cost: float = 0.0) -> list[dict]:
    """Per round: measured step of variant `name` and the model's prediction from that round's
    compute and loopback figures; `sync_cost`: seconds added to every collective's latency."""
    step = result["steps"][name]
    step.update(model=name, concat_views=False, world=result["world"])
    comm = scaling_model.load_inventory_steps([step])[(name, False)]
    n, out = result["world"], []
    for r in result["rounds"]:
        def cost(kind: str, nbytes: float, ranks: int, r: dict = r) -> float:
            return r["latency"] + sync_cost + nbytes / r["bandwidth"]
        compute = scaling_model.Compute(r[f"{name}_compute"], 0.0, "measured")
        # CPUSyncBatchNorm: one all-reduce each way; the check's steps read no metric
        opt = scaling_model.Options(bn_collective="all_reduce", log_every=10**9, sync_bn=name != "no_sync_bn")
        model = scaling_model.step_time(comm, compute, n, result["per_rank"], cost, opt).total
        out.append({"measured": r[f"{name}_step"], "model": model, "compute": r[f"{name}_compute"],
                    "latency": r["latency"], "bandwidth": r["bandwidth"]})
    return out


def sync_cost_from(result: dict, name: str) -> float:
    """The per-collective cost the loopback probe misses (ranks arriving apart on a shared machine),
    from variant `name`: median over rounds of (measured - model) / collectives in its step."""
    calls = result["steps"][name]["calls"]
    return statistics.median((r["measured"] - r["model"]) / calls for r in predict(result, name))


def run(nproc: int, rounds: int, per_rank: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(comm_inventory._free_port()), __file__, "--worker",
               "--rounds", str(rounds), "--per-rank", str(per_rank), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"check with {nproc} processes failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", default="2,4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-rank", type=int, default=4)
    p.add_argument("--out", type=Path, help="write the raw rounds as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.rounds, args.per_rank, args.out)
        return 0
    print("| processes | variant | collectives | compute s | measured step s | model s | error | "
          "model + sync cost s | error |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    raw = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        result = run(nproc, args.rounds, args.per_rank)
        raw.append(result)
        sync = sync_cost_from(result, "concat")  # fitted on one variant, predicts the others

        def cell(rows: list[dict], key: str) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        for name in VARIANTS:
            plain, fitted = predict(result, name), predict(result, name, sync)
            measured = statistics.median(r["measured"] for r in plain)

            def err(rows: list[dict]) -> str:
                return f"{(statistics.median(r['model'] for r in rows) - measured) / measured:+.0%}"
            print(f"| {nproc} | {name} | {result['steps'][name]['calls']} | {cell(plain, 'compute')} | "
                  f"{cell(plain, 'measured')} | {cell(plain, 'model')} | {err(plain)} | {cell(fitted, 'model')} | "
                  f"{err(fitted)}{' (fitted here)' if name == 'concat' else ''} |", flush=True)
        probe = result["rounds"]
        print(f"|  | loopback: latency {statistics.median(r['latency'] for r in probe) * 1e6:.0f} us, "
              f"{statistics.median(r['bandwidth'] for r in probe) / 1e9:.2f} GB/s; sync cost {sync * 1e3:.2f} ms "
              f"per collective |  |  |  |  |  |  |  |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
