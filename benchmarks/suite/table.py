"""The results as Markdown: one header line, one row per figure, the targets, the stages' times."""

from __future__ import annotations

from typing import Any

from benchmarks.suite.model import DDP_LABEL
from benchmarks.suite.records import RUNNING
from benchmarks.suite.sizes import BYOL_COST


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def byol_bar(res: dict[str, dict]) -> float | None:
    """3/8 of the faster supervised ceiling measured (eager in A, compiled in B)."""
    rates = [res.get(s, {}).get("images_per_sec") for s in ("ceiling", "ceiling_compiled")]
    rates = [r for r in rates if r]
    return max(rates) / BYOL_COST if rates else None


def targets(res: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met: yes | no | not measured) for issue 18's four targets."""
    def check(value: float | None, ok: bool, fmt: str) -> tuple[str, str]:
        return ("-", "not measured") if value is None else (fmt.format(value), "yes" if ok else "no")

    model = res.get("model", {})
    eager = next((v for v in model.get("variants", []) if v.get("images_per_sec")), None)
    bar = byol_bar(res)
    rows = {c["name"]: c for c in res.get("peers", {}).get("contenders", []) if c.get("status") == "ok"}
    peer_rates = [rows[p]["images_per_sec"] for p in ("lightly", "byol-pytorch") if p in rows]
    vs_peer = rows["fastbyol"]["images_per_sec"] / max(peer_rates) if peer_rates and "fastbyol" in rows else None
    vs_bar = eager["images_per_sec"] / bar if eager and bar else None
    share = res.get("fused", {}).get("share_foreach")
    out = [("fastbyol / the faster peer >= 1.3 (peers stage, same run)",
            *check(vs_peer, (vs_peer or 0) >= 1.3, "{:.2f}x")),
           ("model-only eager / (3/8 ceiling) >= 0.9", *check(vs_bar, (vs_bar or 0) >= 0.9, "{:.2f}")),
           ("LARS + EMA (foreach) < 2 % of the eager step", *check(share, (share or 1) < 0.02, "{:.1%}"))]
    for stage, backend in (("loader", "ffcv"), ("dali", "dali")):
        b = (res.get(stage, {}).get("backends") or {}).get(backend, {})
        ratio = b.get("end_to_end_over_model")
        out.append((f"{backend}: end-to-end / model-only >= 0.97", *check(ratio, (ratio or 0) >= 0.97, "{:.3f}")))
    return out


def markdown(records: list[dict]) -> str:
    """The newest record of each stage (records.latest) as Markdown."""
    res = {r["stage"]: (r.get("result") or {}) for r in records}
    env = res.get("environment", {})
    bar = byol_bar(res)
    runs = ", ".join(sorted({r["run"] for r in records}))
    lines = [f"fastbyol GPU suite, runs {runs}: `python -m benchmarks.gpu_suite run A|B` (source images/sec)", "",
             f"{env.get('gpu', '-')} (driver {env.get('driver') or '-'}), torch {env.get('torch', '-')}, "
             f"CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, {env.get('cpu_count', '-')} CPUs, "
             f"Python {env.get('python', '-')}", "",
             "| what | variant | batch | images/sec | vs 3/8 ceiling | peak GiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]

    def row(what: str, variant: str, batch: Any, rate: float | None, peak: Any = None, note: str = "",
            vs_bar: bool = True) -> None:
        ratio = _fmt(rate / bar, 2) if rate and bar and vs_bar else "-"
        gib = _fmt(peak / 2**30, 1) if peak else "-"
        lines.append(f"| {what} | {variant} | {batch if batch is not None else ''} | {_fmt(rate)} | {ratio} | {gib} "
                     f"| {note} |")

    for stage in ("ceiling", "ceiling_compiled"):
        c = res.get(stage)
        if c:
            note = f"3/8 = {_fmt(c['byol_bar'])}; the BYOL bar is 3/8 of the faster ceiling" if "byol_bar" in c else ""
            row("supervised ceiling", c.get("variant", stage), c.get("batch"), c.get("images_per_sec"), vs_bar=False,
                note=note)
    for stage, what in (("model", "fastbyol model-only"), ("ddp", DDP_LABEL), ("compile", "fastbyol model-only"),
                        ("cudagraphs", "fastbyol model-only")):
        block = res.get(stage, {})
        if block.get("skipped"):
            row(what, stage, None, None, note=f"skipped: {block['skipped']}")
        for v in block.get("variants", []):
            note = v.get("error", "")
            if "stride_warnings" in v:
                warned = v["stride_warnings"]
                note = f"grad-stride warnings: {len(warned)}" + (f" ({warned[0][:60]})" if warned else "")
            if "compile_seconds" in v:
                note = f"first step (compile) {v['compile_seconds']:.0f} s"
            row(what, v["name"], v["batch"], v.get("images_per_sec"), v.get("peak_memory_bytes"), note)
    if "host_syncs" in res.get("model", {}):
        lines.append(f"| host syncs inside one step | | | | | | {res['model']['host_syncs']} |")
    fused = res.get("fused", {})
    if fused.get("share_foreach") is not None:
        shares = f"{100 * fused['share_foreach']:.1f} % / {100 * fused['share_per-param loop']:.1f} %"
        lines.append(f"| LARS + EMA share of the eager step | foreach / per-param loop | | | | | {shares} |")
    launches = fused.get("lars_launches")
    if launches:
        lines.append(f"| one LARS step | foreach | | | | | {launches['aten_ops']} aten ops, "
                     f"{launches['cuda_kernels'] if launches['cuda_kernels'] is not None else '-'} CUDA kernels, "
                     f"tensors per group {launches['tensors']} |")
    for c in res.get("peers", {}).get("contenders", []):
        row("peer step", c["name"], res["peers"]["settings"]["batch"], c.get("images_per_sec"),
            c.get("peak_memory_bytes"), "" if c["status"] == "ok" else f"{c['status']}: {c['reason'][:80]}")
    for p in res.get("sweep", {}).get("points", []):
        note = p["error"] or f"step {1e3 * p['step_time_s']:.1f} ms"
        row("step time vs per-GPU batch", p["variant"], p["batch"], p["images_per_sec"], p["peak_memory_bytes"], note)
    for stage in ("loader", "dali"):
        block = res.get(stage, {})
        if block.get("skipped"):
            lines.append(f"| loader hidden | {stage} | | | | | skipped: {block['skipped']} |")
        for backend, b in (block.get("backends") or {}).items():
            if "error" in b:
                lines.append(f"| loader hidden | {backend} | | | | | {b['error'][:120]} |")
                continue
            row("loader hidden", backend, block.get("batch"), b["end_to_end"],
                note=f"loader {_fmt(b['loader'])}, model {_fmt(b['model'])}, e2e/model "
                     f"{b['end_to_end_over_model']:.3f}, {b['verdict']}")
    aug = res.get("augment", {})
    for view in ("view1", "view2"):
        if view in aug:
            a = aug[view]
            lines.append(f"| view augmentation, eager vs torch.compile | {view} | {aug['batch']} | | | | eager "
                         f"{a['eager_ms']:.2f} ms, compiled {a['compiled_ms']:.2f} ms ({a['speedup']:.2f}x), compile "
                         f"{a['compile_s']:.0f} s, max difference {a['max_abs_diff']:.1e} |")
    lines += ["", "| target (issue 18) | measured | met |", "| --- | ---: | --- |"]
    lines += [f"| {what} | {value} | {met} |" for what, value, met in targets(res)]
    lines += ["", "| stage | run | status | seconds | budget s |", "| --- | --- | --- | ---: | ---: |"]
    for r in records:
        status = "cut off: the command ended inside this stage" if r["status"] == RUNNING else r["status"]
        lines.append(f"| {r['stage']} | {r['run']} | {status} | {r['seconds']:.0f} | {r['budget_s']:.0f} |")
    return "\n".join(lines) + "\n"
