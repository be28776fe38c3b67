"""What a user sees of a run: a progress bar (or plain lines), metrics.jsonl, and a plot at the end.

Only rank 0 creates a `RunMonitor` that writes; other ranks get one with `enabled=False`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fastbyol import dist
from fastbyol.tensorboard_log import TensorBoardLog
from fastbyol.utilization import mfu


class Throughput:
    """Images/sec over a moving window of the last `window` (time, images) readings."""

    def __init__(self, window: int = 5):
        self.points: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def update(self, images_seen: int, now: float | None = None) -> float:
        self.points.append((time.perf_counter() if now is None else now, images_seen))
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def reset(self) -> None:
        self.points.clear()


class MetricWindow:
    """The training metrics of the steps since the last log line, and where their time went.

    Loss, cosine and collapse std are summed on the device (no host sync per step). The wall time
    of the window is split into the time the loop waited for the loader (inside `next` of
    `batches`) and the rest (the step, logging, checkpoints). `flush` takes the means over the
    window and over ranks (the one host sync of a log window) and starts the next window.
    """

    def __init__(self, device: torch.device, images_per_step: int, world_size: int = 1,
                 flops_per_image: float | None = None, peak_flops: float | None = None,
                 first_step: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.clock = device, clock  # clock: seconds, monotonic (tests pass one they move)
        self.sums = torch.zeros(3, device=device)  # loss, cosine, collapse std
        self.first_nonfinite = torch.full((), math.inf, device=device)  # window index of the first non-finite loss
        self.nonfinite_step: int | None = None  # set by flush: the first step of its window whose loss was not finite
        self.skipped_before = 0  # fp16: the grad scaler's skipped steps counted at the last flush
        self.steps = 0
        self.images_per_step, self.world_size = images_per_step, world_size
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.speed = Throughput()
        self.speed.update(first_step * images_per_step, now=self.clock())
        self.wait_s = 0.0
        self.start = self.clock()
        self.total = {"images": 0, "wall_s": 0.0, "wait_s": 0.0}  # over every flushed window

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches`, timing how long each one took to arrive."""
        it = iter(batches)
        while True:
            t = self.clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += self.clock() - t
            yield batch

    def add(self, loss: torch.Tensor, cosine: torch.Tensor, collapse_std: torch.Tensor) -> None:
        self.sums += torch.stack([t.detach().to(self.sums.dtype) for t in (loss, cosine, collapse_std)])
        # where a divergence began, kept on the device: read only if the window's mean is not finite
        index = torch.where(torch.isfinite(loss.detach()), math.inf, float(self.steps))
        self.first_nonfinite = torch.minimum(self.first_nonfinite, index)
        self.steps += 1

    def flush(self, step: int, skipped_steps: int | None = None) -> dict[str, Any]:
        """The window's record fields (means over ranks): loss, cosine, collapse_std;
        images_per_sec (summed over ranks, over the last few windows); loader_wait_share (of the
        window's wall time), step_time_s, mfu (None: no known peak for this device and
        precision), on CUDA peak_memory_gib (the most allocated since the start), and with
        `skipped_steps` (fp16: the grad scaler's count since the start) skipped_steps of the window.
        A loss that is not finite sets `nonfinite_step` (the window's first such step, over ranks)."""
        wall = self.clock() - self.start
        timing = torch.tensor([self.wait_s, wall], device=self.device)
        means = dist.all_reduce_mean(torch.cat([self.sums / self.steps, timing.to(self.sums.dtype)]))
        loss, cos, std, wait, wall = means.tolist()
        images = self.steps * self.images_per_step
        record: dict[str, Any] = {
            "loss": loss, "cosine": cos, "collapse_std": std,
            "images_per_sec": self.speed.update(step * self.images_per_step, now=self.clock()),
            "loader_wait_share": min(1.0, wait / wall) if wall > 0 else 0.0,
            "step_time_s": wall / self.steps,
            "mfu": None if self.flops_per_image is None or wall <= 0 else
            mfu(self.flops_per_image, images / wall / self.world_size, self.peak_flops),
        }
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if skipped_steps is not None:
            record["skipped_steps"] = skipped_steps - self.skipped_before
            self.skipped_before = skipped_steps
        self.nonfinite_step = None
        if not math.isfinite(loss):  # diverged: one more read, once
            first = min(r[0] for r in dist.gather_floats([self.first_nonfinite.item()], self.device))
            self.nonfinite_step = step - self.steps + 1 + int(first) if math.isfinite(first) else step
        self.first_nonfinite.fill_(math.inf)
        self.total["images"] += images
        self.total["wall_s"] += wall
        self.total["wait_s"] += wait
        self.sums.zero_()
        self.steps = 0
        self.wait_s, self.start = 0.0, self.clock()
        return record

    def pause(self, step: int) -> None:
        """Leave out the time since the last flush (e.g. an evaluation) from every figure."""
        self.speed.reset()
        self.speed.update(step * self.images_per_step, now=self.clock())
        self.wait_s, self.start = 0.0, self.clock()


def time_figures(record: dict[str, Any]) -> str:
    """Where a window's time went, as the progress line shows it:
    'wait 12%  step 0.153 s  MFU 41.2%' (MFU unknown without a known peak; '  mem 3.2 GiB' on CUDA)."""
    mfu = record.get("mfu")
    text = (f"wait {100 * record['loader_wait_share']:.0f}%  step {record['step_time_s']:.3g} s  "
            f"MFU {'unknown' if mfu is None else f'{100 * mfu:.1f}%'}")
    if "peak_memory_gib" in record:
        text += f"  mem {record['peak_memory_gib']:.1f} GiB"
    return text


class RunMonitor:
    """Progress display and metrics file of one training run."""

    def __init__(self, run_dir: Path, total_steps: int, mode: str = "auto", enabled: bool = True,
                 first_step: int = 0, tensorboard: bool = False):
        self.enabled = enabled
        # TensorBoard events beside metrics.jsonl (logging.tensorboard), the same records
        self.tensorboard = TensorBoardLog(run_dir, first_step) if enabled and tensorboard else None
        self.total_steps = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = Console(file=sys.stderr)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode = mode if enabled else "none"
        self.progress: Progress | None = None
        if self.mode == "rich":
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[img_s]:>7.1f} img/s  loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}"
                           "  τ {task.fields[tau]:.5f}  std {task.fields[std]:.4f}  {task.fields[time]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, epoch=0,
                                               img_s=0.0, loss=float("nan"), lr=0.0, tau=0.0, std=float("nan"),
                                               time="")
            self.progress.start()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics line and refresh the display; record holds step, epoch, loss, lr, tau, ..."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.scalars(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], epoch=record["epoch"],
                                 img_s=record["images_per_sec"], loss=record["loss"], lr=record["lr"],
                                 tau=record["tau"], std=record["collapse_std"], time=time_figures(record))
        elif self.mode == "plain":
            extra = "".join(f"  {k} {v:.4f}" for k, v in record.items() if k.startswith("knn"))
            self.console.print(
                f"step {record['step']}/{self.total_steps}  epoch {record['epoch']}  "
                f"{record['images_per_sec']:.1f} img/s  loss {record['loss']:.4f}  lr {record['lr']:.4g}  "
                f"tau {record['tau']:.5f}  std {record['collapse_std']:.4f}  {time_figures(record)}{extra}",
                highlight=False, soft_wrap=True)

    def note(self, record: dict[str, Any]) -> None:
        """Write one metrics line that is not a training step's (e.g. the end-of-run kNN baseline)."""
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.tensorboard is not None:
                self.tensorboard.scalars(record)

    def picture(self, name: str, picture: Image.Image, step: int) -> None:
        """A picture of the run (views.png): into TensorBoard too, when it is on."""
        if self.tensorboard is not None:
            self.tensorboard.image(name, picture, step)

    def message(self, text: str) -> None:
        if self.enabled and self.mode != "none":
            self.console.print(text, highlight=False, soft_wrap=True)  # a log file wants whole lines

    def __enter__(self) -> RunMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.enabled and not self.file.closed:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss and images/sec against steps as a PNG; None (with the reason printed) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("metrics plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set_ylabel("BYOL loss")
    ax_loss.grid(alpha=0.3)
    ax_speed.plot(steps, [r["images_per_sec"] for r in rows], color="tab:orange")
    ax_speed.set_ylabel("images / sec")
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
