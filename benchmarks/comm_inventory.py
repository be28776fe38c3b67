"""What one BYOL training step sends: every collective of a real `fastbyol train` step, recorded.

    python benchmarks/comm_inventory.py --nproc 2 --out benchmarks/data/comm_inventory.json
    python benchmarks/comm_inventory.py --nproc 4 --models 18x1,50x1 --append --out benchmarks/data/comm_inventory.json

Each configuration runs `fastbyol.train.train` for 3 steps under torchrun (gloo, CPU, one thread
per process, synthetic 32 px views, 2 images per rank) inside a `CollectiveRecorder`, and keeps the
collectives between the ends of steps 2 and 3: DDP has rebuilt its buckets by then, and the
segment holds one forward and backward, one metric reduction and one stop agreement (the loop
reads both every `logging.log_every` steps; here every step).

The recorder sees two paths:
- the Python collectives of torch.distributed (all_reduce, all_gather, all_gather_into_tensor,
  broadcast, reduce_scatter_tensor, barrier, the *_object ones) and `_broadcast_coalesced`, which
  DDP's buffer broadcast calls: wrapped while recording, each call classified by who called it
  (CPUSyncBatchNorm or torch's SyncBatchNorm forward / backward, fastbyol.metrics, the stop flag);
- DDP's gradient buckets, which its C++ reducer all-reduces without the Python API: a comm hook
  (DistributedDataParallel.register_comm_hook) notes each bucket, then runs torch's default
  all-reduce hook (divide by the world size, all-reduce: what the reducer does by itself).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# torch.distributed function -> the kind of collective it is
WRAPPED = {"all_reduce": "all_reduce", "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
           "all_gather_single": "all_gather", "broadcast": "broadcast", "_broadcast_coalesced": "broadcast",
           "reduce_scatter_tensor": "reduce_scatter", "barrier": "barrier",
           "all_gather_object": "all_gather_object", "broadcast_object_list": "broadcast_object"}
BN_FILES = (os.path.join("fastbyol", "models", "sync_batchnorm.py"), os.path.join("torch", "nn", "modules", "_functions.py"))


@dataclass
class Collective:
    seq: int  # order of the call in this process
    kind: str  # all_reduce | all_gather | broadcast | reduce_scatter | barrier | *_object
    where: str  # syncbn_forward | syncbn_backward | ddp_bucket | ddp_buffers | metric | stop | other:<file>:<function>
    bytes: int  # payload this rank puts in (an all-gather's input; the sum of the tensors of a coalesced broadcast)
    out_bytes: int  # what this rank holds after it (an all-gather's output: group size x input)
    group_size: int  # ranks taking part
    layer: str = ""  # SyncBN forward: the BatchNorm module's name in the DDP-wrapped model
    channels: int = 0  # SyncBN: the layer's channels
    tensors: int = 1  # tensors in the call (a bucket's parameters, a coalesced broadcast's buffers)
    seconds: float = 0.0  # wall time of the call (0 for the asynchronous bucket all-reduces)


def _nbytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


class CollectiveRecorder:
    """Records every collective of this process while active (a context manager).

    `mark(step)` ends a segment (pass it as train()'s step_hook); `segment(i)` is the list of
    collectives between marks i-1 and i.
    """

    def __init__(self) -> None:
        self.records: list[Collective] = []
        self.marks: list[int] = []  # len(records) at each mark
        self.names: dict[int, str] = {}  # id(module) -> name, for the SyncBN layers
        self._depth = 0  # > 0 inside a recorded call: its inner collectives are not recorded again
        self._saved: dict[str, Callable] = {}
        self._ddp = None

    # ---- recording
    def mark(self, step: int = 0) -> None:
        self.marks.append(len(self.records))

    def segment(self, i: int) -> list[Collective]:
        """Collectives between mark i-1 and mark i (i = 0: from the start to the first mark)."""
        start = self.marks[i - 1] if i > 0 else 0
        return self.records[start:self.marks[i]]

    def _add(self, kind: str, where: str, nbytes: int, out_bytes: int, group: object, **extra: object) -> Collective:
        size = tdist.get_world_size(group) if tdist.is_initialized() else 1
        record = Collective(len(self.records), kind, where, nbytes, out_bytes, size, **extra)
        self.records.append(record)
        return record

    def _classify(self) -> tuple[str, str, int]:
        """(where, layer name, channels) of the collective being called, from the caller's frames."""
        frame = sys._getframe(2)
        first_outside = ""
        while frame is not None:
            path, func = frame.f_code.co_filename, frame.f_code.co_name
            if path.endswith(BN_FILES):
                if func == "backward":
                    return "syncbn_backward", "", 0
                if func == "forward":
                    module = frame.f_locals.get("self")
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        return "syncbn_forward", self.names.get(id(module), "?"), module.num_features
            elif path.endswith(os.path.join("torch", "nn", "modules", "batchnorm.py")) and func == "forward":
                module = frame.f_locals.get("self")
                return "syncbn_forward", self.names.get(id(module), "?"), getattr(module, "num_features", 0)
            elif path.endswith(os.path.join("fastbyol", "metrics.py")):
                return "metric", "", 0
            elif func in ("_should_stop", "should_stop"):  # the loop's stop agreement
                return "stop", "", 0
            elif path.endswith(os.path.join("torch", "nn", "parallel", "distributed.py")) and func == "_sync_buffers":
                return "ddp_buffers", "", 0
            elif not first_outside and "torch" not in Path(path).parts and path != __file__ \
                    and not path.endswith(os.path.join("fastbyol", "dist.py")):
                first_outside = f"other:{Path(path).name}:{func}"
            frame = frame.f_back
        return first_outside or "other", "", 0

    def _wrap(self, name: str, fn: Callable) -> Callable:
        kind = WRAPPED[name]
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # pybind functions (_broadcast_coalesced): positional (pg, tensors, ...)
            signature = None

        def recorded(*args: object, **kwargs: object) -> object:
            if self._depth:
                return fn(*args, **kwargs)
            if signature is None:
                group, payload, out = args[0], args[1], args[1]
            else:
                a = signature.bind_partial(*args, **kwargs).arguments
                group = a.get("group")
                payload = a.get("tensor", a.get("input_tensor", a.get("input", a.get("tensor_list"))))
                out = a.get("tensor_list", a.get("output_tensor_list", a.get("output_tensor", a.get("output", payload))))
            where, layer, channels = self._classify()
            nbytes = _nbytes(payload)
            record = self._add(kind, where, nbytes, _nbytes(out) if kind == "all_gather" else nbytes, group,
                               layer=layer, channels=channels,
                               tensors=len(payload) if isinstance(payload, (list, tuple)) else 1)
            start = time.perf_counter()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                record.seconds = time.perf_counter() - start
        return recorded

    def _bucket_hook(self, state: object, bucket: tdist.GradBucket) -> torch.futures.Future:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        self._add("all_reduce", "ddp_bucket", _nbytes(buffer), _nbytes(buffer), state,
                  tensors=len(bucket.parameters()))
        self._depth += 1  # the hook's own dist.all_reduce is this record
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            self._depth -= 1

    # DDP checks the hook's annotations, which `from __future__ import annotations` makes strings
    _bucket_hook.__annotations__ = {"state": object, "bucket": tdist.GradBucket,
                                    "return": torch.futures.Future[torch.Tensor]}

    def watch(self, model: nn.Module) -> None:
        """Name the BatchNorm layers of `model` in the records (as named_modules() does)."""
        self.names.update({id(m): name for name, m in model.named_modules()})

    def __enter__(self) -> CollectiveRecorder:
        for name in WRAPPED:
            if hasattr(tdist, name):
                self._saved[name] = getattr(tdist, name)
                setattr(tdist, name, self._wrap(name, self._saved[name]))
        recorder, ddp = self, nn.parallel.DistributedDataParallel

        class RecordedDDP(ddp):  # every DDP built while recording reports its buckets
            def __init__(self, module: nn.Module, *args: object, **kwargs: object) -> None:
                super().__init__(module, *args, **kwargs)
                recorder.watch(self)
                self.register_comm_hook(None, recorder._bucket_hook)

        self._ddp = ddp
        nn.parallel.DistributedDataParallel = RecordedDDP
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(tdist, name, fn)
        nn.parallel.DistributedDataParallel = self._ddp


def summarize(records: list[Collective]) -> dict:
    """Per (where, kind): calls and bytes; the SyncBN layers and the buckets in call order."""
    totals: dict[str, dict] = defaultdict(lambda: {"calls": 0, "bytes": 0, "out_bytes": 0, "seconds": 0.0})
    for r in records:
        t = totals[f"{r.where} {r.kind}"]
        t["calls"] += 1
        t["bytes"] += r.bytes
        t["out_bytes"] += r.out_bytes
        t["seconds"] += r.seconds
    return {
        "totals": dict(totals),
        "calls": len(records),
        "bytes": sum(r.bytes for r in records),
        "syncbn_forward": [[r.layer, r.channels, r.bytes, r.group_size] for r in records if r.where == "syncbn_forward"],
        "syncbn_backward": [[r.bytes, r.group_size] for r in records if r.where == "syncbn_backward"],
        "buckets": [[r.bytes, r.tensors, r.group_size] for r in records if r.where == "ddp_bucket"],
        "order": [r.where for r in records],  # e.g. where the buckets fall among the SyncBN backward calls
        "bucket_after": bucket_after(records),
    }


def bucket_after(records: list[Collective]) -> list[int]:
    """For each gradient bucket, how many SyncBN backward calls came before it: when its
    gradients were ready, in the backward's own measure."""
    out, seen = [], 0
    for r in records:
        if r.where == "syncbn_backward":
            seen += 1
        elif r.where == "ddp_bucket":
            out.append(seen)
    return out


def count_ops(overrides: list[str]) -> int:
    """aten operators one training step dispatches in a single process (plain BatchNorm, the LARS
    and EMA steps included): what multiplies the fixed per-operator cost in scaling_model.py."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastbyol.config import load_config
    from fastbyol.dist import DistInfo
    from fastbyol.step import build_components, train_step

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(None, [*overrides, "data.batch_size=2"])
    c = build_components(cfg, torch.device("cpu"), DistInfo(), peak_lr=0.1)
    size = cfg.augment.view1.crop_size
    views = [torch.randn(2, 3, size, size) for _ in range(2)]
    train_step(c, *views, 0.1, 0.99)  # the first step creates the optimizer state
    with Count():
        train_step(c, *views, 0.1, 0.99)
    return Count.calls


def derive_step(depth: int, width: int, concat: bool, bucket_cap_mb: int = 25) -> dict:
    """The per-step totals a recording would give, counted from the model's layer list instead
    (built on the meta device: no memory), for models too large to record here. The counting rule
    is the one tests/test_scaling.py checks against recordings."""
    from fastbyol.config import load_config
    from fastbyol.step import build_model

    cfg = load_config(None, config_overrides(depth, width, concat, 2, 1))
    with torch.device("meta"):
        byol = build_model(cfg)
    views = 1 if concat else 2
    bn = {n: m.num_features for n, m in byol.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    online = [c for n, c in bn.items() if not n.startswith("target_")]
    grads = [p.numel() * 4 for p in byol.online_parameters()][::-1]
    buckets, filled = [], 0
    for size in grads:
        filled += size
        if filled >= bucket_cap_mb * 2**20:
            buckets.append(filled)
            filled = 0
    buckets += [filled] if filled else []
    per_call = lambda c: 8 * (2 * c + 1)  # noqa: E731 - CPUSyncBatchNorm's payload
    totals = {"syncbn_forward all_reduce": {"calls": views * len(bn), "bytes": views * sum(map(per_call, bn.values()))},
              "syncbn_backward all_reduce": {"calls": views * len(online), "bytes": views * sum(map(per_call, online))},
              "ddp_bucket all_reduce": {"calls": len(buckets), "bytes": sum(buckets)},
              "ddp_buffers broadcast": {"calls": 1, "bytes": sum(b.numel() * b.element_size() for b in byol.buffers())},
              "metric all_reduce": {"calls": 1, "bytes": 20}, "stop all_reduce": {"calls": 1, "bytes": 4}}
    return {"model": f"{depth}x{width}", "concat_views": concat, "world": "derived", "totals": totals,
            "calls": sum(t["calls"] for t in totals.values()), "bytes": sum(t["bytes"] for t in totals.values())}


# ---------------------------------------------------------------- one configuration, under torchrun


def config_overrides(depth: int, width: int, concat: bool, per_rank: int, world: int, size: int = 32,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """The run recorded: the model of the paper's heads at `depth`/`width`, small synthetic views."""
    return [f"model.depth={depth}", f"model.width={width}", f"byol.concat_views={str(concat).lower()}",
            "data.backend=synthetic", f"data.batch_size={per_rank * world}", "data.synthetic_steps=3",
            f"augment.view1.crop_size={size}", f"augment.view2.crop_size={size}", "train.max_steps=3",
            "train.epochs=1", "train.precision=fp32", "train.device=cpu", "train.checkpoint_every=1000",
            "logging.progress=none", "logging.log_every=1", "logging.plot=false", "data.num_workers=0",
            "dist.gradient_as_bucket_view=true", *extra]


class _Recorded(Exception):
    """Raised by the step hook after the last recorded step: train() stops before its final
    checkpoint (gigabytes for ResNet-200 2x, nothing that is sent)."""


def record_training(overrides: list[str], run_dir: str) -> tuple[CollectiveRecorder, object]:
    """3 steps of `fastbyol train` with `overrides` while recording; (recorder, the config)."""
    from fastbyol.config import load_config
    from fastbyol.train import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [*overrides, f"train.run_dir={run_dir}"], world_size=world)

    def mark(step: int) -> None:
        recorder.mark(step)
        if step == cfg.train.max_steps:
            raise _Recorded

    with CollectiveRecorder() as recorder:
        try:
            train(cfg, force=True, step_hook=mark)
        except _Recorded:
            pass
    return recorder, cfg


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    depth, width = (int(v) for v in args.model.split("x"))
    overrides = config_overrides(depth, width, args.concat, args.per_rank, world)
    with tempfile.TemporaryDirectory() as tmp:
        recorder, _ = record_training(overrides, os.path.join(tmp, "run"))
    if int(os.environ["RANK"]) == 0:
        step = summarize(recorder.segment(2))
        step.update(model=args.model, concat_views=args.concat, world=world, per_rank=args.per_rank)
        Path(args.out).write_text(json.dumps(step))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model: str, concat: bool, nproc: int, per_rank: int, timeout_s: float = 1800) -> dict:
    """One configuration under torchrun; its steady step's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker",
               "--model", model, "--per-rank", str(per_rank), "--out", str(out)] + (["--concat"] if concat else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
            raise RuntimeError(f"{model} concat={concat} N={nproc} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(steps: list[dict]) -> str:
    """Markdown: calls and MB per step by where, for each recorded configuration."""
    rows = ["| ResNet | views | N | SyncBN fwd calls / MB | SyncBN bwd calls / MB | DDP buckets / MB | "
            "buffer broadcasts / MB | metric + stop calls | all calls |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in steps:
        t = s["totals"]

        def cell(key: str) -> str:
            v = t.get(key, {"calls": 0, "bytes": 0})
            return f"{v['calls']} / {v['bytes'] / 1e6:.2f}"
        small = sum(v["calls"] for k, v in t.items() if k.startswith(("metric", "stop")))
        rows.append(f"| {s['model']} | {'concat' if s['concat_views'] else 'per view'} | {s['world']} | "
                    f"{cell('syncbn_forward all_reduce')} | {cell('syncbn_backward all_reduce')} | "
                    f"{cell('ddp_bucket all_reduce')} | {cell('ddp_buffers broadcast')} | {small} | {s['calls']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="18x1,18x2,50x1,50x2,200x1,200x2", help="DEPTHxWIDTH, comma-separated")
    p.add_argument("--nproc", default="2,4", help="process counts, comma-separated")
    p.add_argument("--per-rank", type=int, default=2, help="images per rank per step")
    p.add_argument("--out", default="comm_inventory.json")
    p.add_argument("--append", action="store_true", help="add to the records already in --out")
    p.add_argument("--table", action="store_true", help="print the table of the records in --out and stop")
    p.add_argument("--derive", default="", help="with --table: DEPTHxWIDTH rows counted from the layer list")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--concat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.table:
        derived = [derive_step(*(int(v) for v in m.split("x")), concat) for m in args.derive.split(",") if m
                   for concat in (False, True)]
        print(table(json.loads(Path(args.out).read_text()) + derived))
        return 0
    torch.set_num_threads(1)
    steps = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).exists() else []
    for model in args.models.split(","):
        for nproc in (int(n) for n in args.nproc.split(",")):
            for concat in (False, True):
                start = time.perf_counter()
                steps.append(run_config(model, concat, nproc, args.per_rank))
                depth, width = (int(v) for v in model.split("x"))
                steps[-1]["ops_per_step"] = count_ops(config_overrides(depth, width, concat, args.per_rank, 1))
                del steps[-1]["order"]  # bucket_after keeps what the model needs of it
                print(f"{model} concat={concat} N={nproc}: {steps[-1]['calls']} calls, "
                      f"{steps[-1]['bytes'] / 1e6:.1f} MB ({time.perf_counter() - start:.0f} s)", flush=True)
                Path(args.out).write_text(json.dumps(steps))
    print(table(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
