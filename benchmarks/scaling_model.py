"""BYOL step time at N GPUs: compute at the per-GPU batch + the communication that is not hidden.

    python benchmarks/scaling_model.py                          # the tables of docs/scaling.md
    python benchmarks/scaling_model.py --sweep SWEEP.jsonl      # compute from the GPU suite's batch sweep
    python benchmarks/scaling_model.py --check 2,4              # the model against gloo on this machine

Inputs, each labelled where it is printed:
- what one step sends: benchmarks/data/comm_inventory.json, recorded by comm_inventory.py from real
  `fastbyol train` steps (measured here);
- the interconnect: NVLink within an 8-GPU node, one 400 Gb/s InfiniBand NDR link per GPU across
  nodes, and NCCL's own latency model (published, addresses in FIGURES);
- the single-GPU step time against the per-GPU batch, t(b) = fixed + b * per_image: from the GPU
  suite's sweep (a JSONL of batch, step_time_s, images_per_sec) when given, else from NVIDIA's
  published supervised ResNet-50 throughput x 8/3 (a BYOL image costs 8/3 of a supervised one)
  and an estimated fixed cost per step (estimates).

The step (torch's SyncBatchNorm on GPUs, DDP):
  forward   compute/2, plus every SyncBN forward's all-gather of (2C+1) float32 per rank on the
            critical path, plus one host sync per call (torch's SyncBN masks the gathered counts);
            DDP's buffer broadcast before it;
  backward  compute/2 spread over the SyncBN backward calls in their recorded order; each call's
            all-reduce of 2C float32 blocks it; each gradient bucket is all-reduced when the
            recording says it was ready, on the same NCCL stream (a SyncBN all-reduce queues behind a
            bucket in flight) unless BatchNorm has its own group; the step waits for the last bucket;
  loop      the metric and stop reductions once per logging.log_every steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
INVENTORY = HERE / "data" / "comm_inventory.json"

NCCL_TUNING = "https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc"
FIGURES = {  # name: (value, unit, how it was obtained)
    "nvlink_busbw": (450.0, "GB/s", "published: 18x 4th-gen NVLink, 900 GB/s per GPU, both directions "
                     "(https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/"
                     "H200-SXM-141GBx8_TRT_MaxQ.json); 450 GB/s one way; nccl-tests all_reduce busbw on 8x H100 "
                     "460-480 GB/s (https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests)"),
    "ib_busbw": (50.0, "GB/s", "published: NDR InfiniBand line rate 400 Gb/s "
                 "(https://docs.nvidia.com/networking/display/800GMMA4Z00NS/Overview), one link per GPU"),
    "nccl_latency": (0.0, "us", f"published: NCCL's tuning model, baseLat / hwLat tables ({NCCL_TUNING})"),
    "rn50_a100_amp": (2470.0, "images/s", "published: supervised ResNet-50 v1.5, PyTorch AMP, 1x A100 80GB, "
                      "batch 256 (https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/"
                      "ConvNets/resnet50v1.5/README.md)"),
    "byol_cost": (8 / 3, "x", "estimate: online forward+backward of 2 views (6 units) + target forward of "
                  "2 views (2) over a supervised step (3)"),
    "fixed_per_op": (4e-6, "s", "estimate: eager PyTorch per-operator host cost that the GPU cannot hide "
                     "once the per-GPU batch is small (times the operators per step, counted here)"),
    "host_sync": (20e-6, "s", "estimate: GPU idle after each host sync of torch's SyncBN forward while the "
                  "host refills the launch queue"),
}

# NCCL's latency model, microseconds (tuning.cc): [algorithm][protocol], protocols LL, LL128, Simple
BASE_LAT = {"tree": (6.8, 14.0, 0.0), "ring": (6.6, 14.0, 8.4)}
HW_LAT = {"nvlink": {"tree": (0.6, 1.25, 28.0), "ring": (0.6, 1.9, 3.4)},
          "net": {"tree": (5.0, 8.5, 28.0), "ring": (2.7, 4.0, 14.0)}}
NET_OVERHEAD_US = 1.0  # per inter-node ring step (x3 for Simple), tuning.cc getNetOverhead
PROTOCOLS = ("LL", "LL128", "Simple")
PROTO_BW = (1 / 4, 0.92, 1.0)  # share of the bus bandwidth each protocol reaches (tuning.cc refinements)


@dataclass(frozen=True)
class Network:
    """GPUs per node; bus bandwidths in bytes/s: NVLink per GPU, InfiniBand per GPU (one NIC each)."""

    per_node: int = 8
    intra_bw: float = FIGURES["nvlink_busbw"][0] * 1e9
    nic_bw: float = FIGURES["ib_busbw"][0] * 1e9

    @property
    def inter_bw(self) -> float:
        """A ring or tree across nodes: NCCL runs one channel per NIC (rail), so a node moves
        per_node x nic_bw (estimate from the line rates; NVLink caps it)."""
        return min(self.intra_bw, self.per_node * self.nic_bw)


def collective_time(kind: str, nbytes: float, ranks: int, net: Network) -> tuple[float, str]:
    """Seconds for one NCCL collective over `ranks` GPUs and the algorithm/protocol NCCL would pick.

    `nbytes`: all-reduce and broadcast: the buffer; all-gather: the OUTPUT (ranks x the input).
    Latency as NCCL models it (ring: 2(N-1) steps for an all-reduce, N-1 for an all-gather, the
    inter-node ones at network latency; tree: 2 (intra-node depth + log2(nodes)) hops); time =
    latency + bytes / algorithm bandwidth, the cheapest (algorithm, protocol), as NCCL chooses.
    """
    if ranks <= 1:
        return 0.0, "-"
    nodes = max(1, math.ceil(ranks / net.per_node))
    ppn = ranks // nodes
    bus = net.intra_bw if nodes == 1 else net.inter_bw
    best = (math.inf, "")
    for algo in ("ring", "tree") if kind == "all_reduce" else ("ring",):
        for p, proto in enumerate(PROTOCOLS):
            intra = HW_LAT["nvlink"][algo][p]
            inter = HW_LAT["net"][algo][p]
            if algo == "ring":
                steps = {"all_reduce": 2 * (ranks - 1), "all_gather": ranks - 1, "broadcast": ranks - 1}[kind]
                inter_steps = {"all_reduce": 2 * nodes, "all_gather": nodes - 1, "broadcast": nodes - 1}[kind] if nodes > 1 else 0
                if nodes > 1:
                    intra = max(intra, NET_OVERHEAD_US * (3 if proto == "Simple" else 1))
                lat = BASE_LAT[algo][p] + (steps - inter_steps) * intra + inter_steps * inter
                moved = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks, "broadcast": 1.0}[kind]
                seconds = lat * 1e-6 + nbytes * moved / (bus * PROTO_BW[p])
            else:
                if proto == "Simple" and nodes == 1:
                    continue  # NCCL's tree/Simple latency (28 us per hop) never wins inside a node
                lat = BASE_LAT[algo][p] + 2 * ((ppn - 1) * intra + math.log2(nodes) * inter)
                seconds = lat * 1e-6 + nbytes * 2 / (0.92 * bus * PROTO_BW[p])  # tree: algbw = busbw / 2
            best = min(best, (seconds, f"{algo}/{proto}"))
    return best


# ---------------------------------------------------------------- what one step sends (recorded)


@dataclass
class StepComm:
    """One step's collectives, from the recorded inventory, as channel counts and byte sizes."""

    model: str
    concat_views: bool
    forward_channels: list[int]  # each SyncBN forward call's C, in call order (online and target)
    backward_channels: list[int]  # each SyncBN backward call's C, in call order
    buckets: list[int]  # gradient bucket bytes, in all-reduce order
    bucket_after: list[int]  # SyncBN backward calls before each bucket became ready
    buffer_bytes: int  # DDP's buffer broadcast
    ops_per_step: int = 0  # aten operators of one step (for the fixed cost)


def load_inventory(path: Path = INVENTORY) -> dict[tuple[str, bool], StepComm]:
    """{(model, concat_views): StepComm} from comm_inventory.py's output file."""
    return load_inventory_steps(json.loads(Path(path).read_text()))


def load_inventory_steps(steps: list[dict]) -> dict[tuple[str, bool], StepComm]:
    """{(model, concat_views): StepComm} from comm_inventory.summarize() records (the smallest world
    of each configuration wins; the collectives do not depend on it)."""
    out: dict[tuple[str, bool], StepComm] = {}
    for s in sorted(steps, key=lambda s: -s["world"]):
        backward = [(b // 8 - 1) // 2 for b, _ in s["syncbn_backward"]]  # CPUSyncBatchNorm: 8 (2C+1) bytes
        after = s["bucket_after"]
        buffers = s["totals"].get("ddp_buffers broadcast", {"bytes": 0})["bytes"]
        out[(s["model"], s["concat_views"])] = StepComm(
            s["model"], s["concat_views"], [c for _, c, _, _ in s["syncbn_forward"]], backward,
            [b[0] for b in s["buckets"]], after, buffers, s.get("ops_per_step", 0))
    return out


# ---------------------------------------------------------------- compute: t(b) = fixed + b * per_image


@dataclass(frozen=True)
class Compute:
    fixed_s: float  # per step, whatever the batch
    per_image_s: float  # per image of the per-GPU batch
    source: str

    def step(self, batch: int) -> float:
        return self.fixed_s + batch * self.per_image_s


def flops_ratio(model: str) -> float:
    """FLOPs of a BYOL step of `model` (DEPTHxWIDTH) over ResNet-50 1x's, at 224 px (counted)."""
    from fastbyol.config import load_config
    from fastbyol.utilization import step_flops_per_image

    def flops(m: str) -> float:
        depth, width = m.split("x")
        return step_flops_per_image(load_config(None, [f"model.depth={depth}", f"model.width={width}",
                                                       "data.backend=synthetic"]))
    return 1.0 if model == "50x1" else flops(model) / flops("50x1")


def published_compute(comm: StepComm) -> Compute:
    """The estimate until the GPU suite's sweep exists: NVIDIA's A100 ResNet-50 figure x 8/3 (other
    models scaled by their counted FLOPs), plus the step's operators x a fixed cost each."""
    ratio = flops_ratio(comm.model)
    per_image = FIGURES["byol_cost"][0] / FIGURES["rn50_a100_amp"][0] * ratio
    fixed = comm.ops_per_step * FIGURES["fixed_per_op"][0]
    scaled = "" if ratio == 1 else f" x {ratio:.2f} (FLOPs of ResNet-{comm.model} over ResNet-50, counted)"
    return Compute(fixed, per_image, f"estimate: A100 supervised ResNet-50 2470 images/s (published) x 8/3{scaled}, "
                                     f"+ {comm.ops_per_step} operators (counted) x {FIGURES['fixed_per_op'][0] * 1e6:.0f} us")


def sweep_compute(path: Path) -> Compute:
    """Least-squares t(b) = fixed + b * per_image through the sweep's (batch, step_time_s) rows."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    points = [(float(r["batch"]), float(r["step_time_s"])) for r in rows if "batch" in r and "step_time_s" in r]
    if len(points) < 2:
        print(f"{path}: expected at least 2 JSON lines with batch and step_time_s, found {len(points)}", file=sys.stderr)
        raise SystemExit(2)
    n = len(points)
    mb, mt = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    slope = sum((b - mb) * (t - mt) for b, t in points) / max(sum((b - mb) ** 2 for b, _ in points), 1e-12)
    fixed = max(0.0, mt - slope * mb)
    return Compute(fixed, slope, f"measured: the GPU suite's sweep {path} ({n} batches), linear fit")


# ---------------------------------------------------------------- the step at N GPUs


@dataclass(frozen=True)
class Options:
    """What fastbyol can change: BN group size (0 = all ranks), SyncBN on/off, its collective, buffers."""

    group: int = 0  # dist.sync_bn_group_size
    sync_bn: bool = True
    # torch's SyncBatchNorm: forward all-gather of (mean, invstd, count) in float32 and a host sync,
    # backward all-reduce of 2C float32; "all_reduce": one all-reduce of (sum x, sum x^2, count) in
    # float64 each way and no host sync (CPUSyncBatchNorm's collectives, on GPUs a proposal)
    bn_collective: str = "all_gather"
    broadcast_buffers: bool = False  # DDP's buffer broadcast before each forward: torch's default, off in fastbyol (SyncBN makes it redundant)
    log_every: int = 20


# cost(kind, nbytes, ranks) -> seconds; kind: all_reduce | all_gather (nbytes = the output) | broadcast
Cost = Callable[[str, float, int], float]


def nccl_cost(net: Network) -> Cost:
    return lambda kind, nbytes, ranks: collective_time(kind, nbytes, ranks, net)[0]


@dataclass
class StepTime:
    n: int
    batch: int  # per GPU
    compute: float
    terms: dict[str, float] = field(default_factory=dict)  # exposed seconds by cause

    @property
    def total(self) -> float:
        return self.compute + sum(self.terms.values())

    @property
    def images_per_s(self) -> float:
        return self.n * self.batch / self.total

    def dominant(self) -> str:
        name, value = max(self.terms.items(), key=lambda kv: kv[1])
        return name if value > 0.1 * self.compute else "compute"


def step_time(comm: StepComm, compute: Compute, n: int, batch: int, cost: Cost, opt: Options = Options()) -> StepTime:
    """Modelled step time of `comm`'s configuration on `n` ranks with `batch` images each."""
    t = compute.step(batch)
    out = StepTime(n, batch, t)
    if n == 1:
        return out
    bn_ranks = (opt.group or n) if opt.sync_bn else 1
    shared_stream = bn_ranks == n  # BN's collectives queue on the gradients' communicator

    def bn(kind: str, channels: int) -> float:
        if bn_ranks == 1:
            return 0.0
        if opt.bn_collective == "all_gather":
            if kind == "forward":
                return cost("all_gather", (2 * channels + 1) * 4 * bn_ranks, bn_ranks) + FIGURES["host_sync"][0]
            return cost("all_reduce", 2 * channels * 4, bn_ranks)
        return cost("all_reduce", (2 * channels + 1) * 8, bn_ranks)

    out.terms["syncbn_forward"] = sum(bn("forward", c) for c in comm.forward_channels)
    out.terms["buffers"] = cost("broadcast", comm.buffer_bytes, n) if opt.broadcast_buffers else 0.0
    # backward: half the compute, spread evenly over the SyncBN backward calls in their recorded order
    calls = len(comm.backward_channels)
    slice_s = (t / 2) / max(calls, 1)
    clock, comm_free, blocked, b = 0.0, 0.0, 0.0, 0
    for i, channels in enumerate(comm.backward_channels + [0]):
        while b < len(comm.buckets) and comm.bucket_after[b] <= i:  # buckets ready by now start
            comm_free = max(clock, comm_free) + cost("all_reduce", comm.buckets[b], n)
            b += 1
        if i == calls:
            break
        clock += slice_s
        wait = bn("backward", channels)
        if wait:
            start = max(clock, comm_free) if shared_stream else clock
            blocked += start - clock + wait
            clock = start + wait
            if shared_stream:
                comm_free = clock
    out.terms["syncbn_backward"] = blocked
    out.terms["ddp_exposed"] = max(0.0, comm_free - clock)
    out.terms["loop"] = 2 * cost("all_reduce", 64, n) / opt.log_every
    return out


# ---------------------------------------------------------------- tables


def scaling_table(comm: StepComm, compute: Compute, net: Network, opt: Options, ns: list[int],
                  global_batch: int | None, per_gpu: int | None) -> str:
    rows = ["| GPUs | nodes | per-GPU batch | compute ms | SyncBN fwd ms | SyncBN bwd ms | DDP exposed ms | "
            "buffers + loop ms | step ms | images/s | efficiency | vs batch 256 | dominant |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    best = 256 / compute.step(256)  # one GPU at a large batch: what N GPUs would ideally give, N times
    for n in ns:
        batch = global_batch // n if global_batch else per_gpu
        s = step_time(comm, compute, n, batch, nccl_cost(net), opt)
        ideal = batch / compute.step(batch)  # one GPU at the same per-GPU batch, no communication
        rows.append(f"| {n} | {math.ceil(n / net.per_node)} | {batch} | {s.compute * 1e3:.1f} | "
                    f"{s.terms['syncbn_forward'] * 1e3:.1f} | {s.terms['syncbn_backward'] * 1e3:.1f} | "
                    f"{s.terms['ddp_exposed'] * 1e3:.1f} | {(s.terms['buffers'] + s.terms['loop']) * 1e3:.1f} | "
                    f"{s.total * 1e3:.1f} | {s.images_per_s:,.0f} | {s.images_per_s / (n * ideal):.0%} | "
                    f"{s.images_per_s / (n * best):.0%} | {s.dominant()} |")
    return "\n".join(rows)


def variants_table(comm: StepComm, concat: StepComm | None, compute: Compute, net: Network, ns: list[int],
                   global_batch: int) -> str:
    """images/s at the global batch for each knob, side by side."""
    variants = [("global SyncBN (paper; torch all-gather)", comm, Options()),
                ("+ DDP's buffer broadcast (torch's default; off in fastbyol)", comm, Options(broadcast_buffers=True)),
                ("BN groups of 8 (one node)", comm, Options(group=8)),
                ("global SyncBN, one all-reduce per call", comm, Options(bn_collective="all_reduce")),
                ("per-GPU BN (dist.sync_bn=false)", comm, Options(sync_bn=False))]
    if concat is not None:
        variants += [("byol.concat_views (global SyncBN)", concat, Options()),
                     ("byol.concat_views + BN groups of 8", concat, Options(group=8))]
    head = "| variant | " + " | ".join(f"{n} GPUs" for n in ns) + " |"
    rows = [head, "| --- |" + " ---: |" * len(ns)]
    for name, c, opt in variants:
        cells = [f"{step_time(c, compute, n, global_batch // n, nccl_cost(net), opt).images_per_s:,.0f}" for n in ns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_table(comm: StepComm, compute: Compute, net: Network, ns: list[int], global_batch: int) -> str:
    """README's table: the paper's global SyncBN against BN groups of one node, at the global batch."""
    rows = ["| GPUs | per-GPU batch | global SyncBN: images/s (efficiency) | dominant term | "
            "BN groups of 8: images/s (efficiency) |", "| ---: | ---: | ---: | --- | ---: |"]
    for n in ns:
        batch = global_batch // n
        ideal = n * batch / compute.step(batch)
        paper = step_time(comm, compute, n, batch, nccl_cost(net))
        groups = step_time(comm, compute, n, batch, nccl_cost(net), Options(group=8))
        rows.append(f"| {n} | {batch} | {paper.images_per_s:,.0f} ({paper.images_per_s / ideal:.0%}) | "
                    f"{paper.dominant().replace('_', ' ')} | {groups.images_per_s:,.0f} ({groups.images_per_s / ideal:.0%}) |")
    return "\n".join(rows)


def report(inventory: dict, compute_for: callable, model: str, ns: list[int], net: Network) -> str:
    comm = inventory[(model, False)]
    concat = inventory.get((model, True))
    compute = compute_for(comm)
    lines = [f"## ResNet-{model.replace('x', ' ')}x, per-view SyncBN", "",
             f"compute: {compute.source}: t(b) = {compute.fixed_s * 1e3:.1f} ms + b x {compute.per_image_s * 1e3:.3f} ms",
             f"communication: {len(comm.forward_channels)} SyncBN forward and {len(comm.backward_channels)} backward "
             f"calls, {len(comm.buckets)} gradient buckets ({sum(comm.buckets) / 1e6:.0f} MB), buffers "
             f"{comm.buffer_bytes / 1e6:.2f} MB per step (measured here: benchmarks/data/comm_inventory.json)", "",
             "### Global batch 4096", "", scaling_table(comm, compute, net, Options(), ns, 4096, None), "",
             "### Fixed per-GPU batch 128", "", scaling_table(comm, compute, net, Options(), ns, None, 128), "",
             "### The knobs at global batch 4096 (images/s)", "", variants_table(comm, concat, compute, net, ns, 4096),
             "", "### Summary (README)", "", summary_table(comm, compute, net, ns, 4096)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inventory", type=Path, default=INVENTORY, help="comm_inventory.py's output")
    p.add_argument("--models", default="50x1", help="DEPTHxWIDTH of the inventory, comma-separated")
    p.add_argument("--gpus", default="8,32,128,256,1024")
    p.add_argument("--sweep", type=Path, help="the GPU suite's JSONL (batch, step_time_s, images_per_sec)")
    p.add_argument("--check", help="process counts: check the model against gloo on this machine (e.g. 2,4)")
    args = p.parse_args(argv)
    if args.check:
        import scaling_check

        return scaling_check.main(args.check)
    inventory = load_inventory(args.inventory)
    sweep = sweep_compute(args.sweep) if args.sweep else None

    def compute_for(comm: StepComm) -> Compute:
        if sweep is None:
            return published_compute(comm)
        ratio = flops_ratio(comm.model)  # the sweep is of ResNet-50 1x
        return Compute(sweep.fixed_s, sweep.per_image_s * ratio,
                       sweep.source + ("" if ratio == 1 else f", x {ratio:.2f} (FLOPs over ResNet-50, counted)"))

    ns = [int(n) for n in args.gpus.split(",")]
    for model in args.models.split(","):
        print(report(inventory, compute_for, model, ns, Network()))
        print()
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    sys.exit(main())
