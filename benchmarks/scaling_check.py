"""The scaling model against what can be measured here: gloo step time for N CPU processes.

    python benchmarks/scaling_check.py --nproc 2,4 --rounds 5

Under torchrun, N processes of one thread each. Every round, interleaved so that the load of a
shared machine touches all three alike:
  1. compute: one training step of a copy of the model with plain BatchNorm and no DDP, at the
     per-rank batch (what the step would cost without any collective);
  2. the real step: DDP + CPUSyncBatchNorm (build_components, train_step), its collectives
     recorded by comm_inventory.CollectiveRecorder;
  3. this machine's loopback: gloo all-reduces of 8 B and 16 MiB -> latency a and bandwidth B.
Prediction for round r: scaling_model.step_time with cost(S) = a + S / B (bytes as CPUSyncBatchNorm
sends them), the round's own compute, and the step's recorded collectives; and the serial bound,
compute + every collective's cost (nothing hidden). Reported: the medians over rounds and their
spread (min-max), and the error of the median prediction.
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


def _worker(rounds: int, per_rank: int, out: Path) -> None:
    from fastbyol import dist
    from fastbyol.config import load_config
    from fastbyol.train import build_components, train_step

    torch.set_num_threads(1)
    info, device = dist.init("cpu")
    cfg = load_config(None, [*MODEL, f"data.batch_size={per_rank * info.world_size}"], world_size=info.world_size)
    alone = build_components(cfg, device, dist.DistInfo(), peak_lr=0.1)  # plain BN, no DDP: compute only
    recorder = comm_inventory.CollectiveRecorder()
    with recorder:
        shared = build_components(cfg, device, info, peak_lr=0.1)
    g = torch.Generator().manual_seed(info.rank)
    views = [torch.randn(per_rank, 3, 16, 16, generator=g) for _ in range(2)]
    for c in (alone, shared):  # warm-up: optimizer state, DDP's bucket rebuild
        for _ in range(2):
            train_step(c, *views, 0.1, 0.99)
    rows = []
    for _ in range(rounds):
        compute = _timed(lambda: train_step(alone, *views, 0.1, 0.99))
        tdist.barrier()
        with recorder:
            recorder.mark()
            start = time.perf_counter()
            train_step(shared, *views, 0.1, 0.99)
            step = time.perf_counter() - start
            recorder.mark()
        latency, bandwidth = _loopback()
        rows.append({"compute": compute, "step": step, "latency": latency, "bandwidth": bandwidth})
    every = dist.all_gather_object(rows)
    if info.is_main:  # per round: the slowest rank's step and compute (the step waits for it), rank 0's probes
        merged = [{**rows[r], "compute": max(e[r]["compute"] for e in every), "step": max(e[r]["step"] for e in every)}
                  for r in range(rounds)]
        summary = comm_inventory.summarize(recorder.segment(len(recorder.marks) - 1))
        out.write_text(json.dumps({"world": info.world_size, "per_rank": per_rank, "rounds": merged, "step": summary}))
    dist.shutdown()


def predict(result: dict) -> list[dict]:
    """Per round: measured step, the model's prediction and the serial bound, from that round's figures."""
    step = result["step"]
    step.update(model="check", concat_views=False, world=result["world"])
    comm = scaling_model.load_inventory_steps([step])[("check", False)]
    n, out = result["world"], []
    for r in result["rounds"]:
        def cost(kind: str, nbytes: float, ranks: int, r: dict = r) -> float:
            return r["latency"] + nbytes / r["bandwidth"]
        compute = scaling_model.Compute(r["compute"], 0.0, "measured")
        opt = scaling_model.Options(bn_collective="all_reduce", log_every=10**9)  # the check's steps read no metric
        model = scaling_model.step_time(comm, compute, n, result["per_rank"], cost, opt).total
        serial = r["compute"] + sum(cost("all_reduce", v["bytes"] / max(v["calls"], 1), n) * v["calls"]
                                    for v in step["totals"].values())
        out.append({"measured": r["step"], "model": model, "serial": serial, **r})
    return out


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
    print("| processes | compute s | loopback latency us | loopback GB/s | measured step s | model s | error | "
          "serial bound s | step collectives |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    raw = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        result = run(nproc, args.rounds, args.per_rank)
        rounds = predict(result)
        raw.append({"world": nproc, "rounds": rounds})

        def cell(key: str, scale: float = 1.0, fmt: str = ".3f") -> str:
            values = [r[key] * scale for r in rounds]
            return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
        measured = statistics.median(r["measured"] for r in rounds)
        model = statistics.median(r["model"] for r in rounds)
        print(f"| {nproc} | {cell('compute')} | {cell('latency', 1e6, '.0f')} | {cell('bandwidth', 1e-9, '.2f')} | "
              f"{cell('measured')} | {cell('model')} | {(model - measured) / measured:+.0%} | {cell('serial')} | "
              f"{result['step']['calls']} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
