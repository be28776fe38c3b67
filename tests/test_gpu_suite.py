"""benchmarks/gpu_suite.py cannot rot between GPU rounds: its `--device cpu --tiny` run goes through
every stage here, and its records are checked for structure and invariants (never for speed);
the DALI parts are joined only when all are there and their checksums match.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

from fastbyol.verdict import VERDICTS  # noqa: E402

RECORD_KEYS = {"run", "stage", "status", "seconds", "budget_s", "result", "error"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny",
           "--out", str(out), "--work", str(work), "--wheelhouse", str(work / "no-wheelhouse"),
           "--dali-parts", str(work / "no-dali-parts"),
           "--budget-scale", "4", "--total", "1800"]  # a slow CI machine must not turn a stage into a timeout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["stage"]: r for r in records}, out, proc.stdout


def positive(x: float) -> bool:
    return x > 0 and math.isfinite(x)


def test_every_stage_runs_and_records_itself(tiny_run):
    stages, out, printed = tiny_run
    assert list(stages) == ["install", *gpu_suite.STAGES]
    for name, r in stages.items():
        assert set(r) == RECORD_KEYS, name
        assert r["status"] == "ok", (name, r["error"])
        assert 0 <= r["seconds"] <= r["budget_s"] + 5, name
    assert len({r["run"] for r in stages.values()}) == 1
    install = stages["install"]["result"]
    assert install["wheels"] == [] and "no wheels" in install["note"] and install["dali"].startswith("not installed")
    env = stages["environment"]["result"]
    assert env["gpu"] == "cpu" and env["cpu_count"] >= 1 and env["imports_torchvision"]
    table = (out / "results.md").read_text()
    assert table in printed
    for stage in stages:
        assert f"| {stage} | ok |" in table
    assert "| fastbyol / the faster peer >= 1.3 (peers stage, same run) |" in table
    assert "| LARS + EMA (foreach) < 2 % of the eager step |" in table


def test_a_stage_past_its_budget_is_stopped_and_the_suite_goes_on(tmp_path):
    """Budgets far below a Python start-up with torch: every stage is killed, each is recorded, and
    with the suite's time spent the rest are recorded as skipped."""
    def run(*extra: str) -> list[dict]:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny",
               "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
               "--wheelhouse", str(tmp_path / "none"), "--dali-parts", str(tmp_path / "none"), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]

    records = run("--stages", "environment,ceiling", "--budget-scale", "0.01")
    assert [(r["stage"], r["status"], r["result"]) for r in records[1:]] == [
        ("environment", "timeout", None), ("ceiling", "timeout", None)]
    assert all(r["seconds"] < r["budget_s"] + 2 and "budget" in r["error"] for r in records[1:])
    records = run("--stages", "model", "--total", "0")
    assert records[-1]["stage"] == "model" and records[-1]["status"].startswith("skipped")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| environment | timeout |" in table and "| model | skipped" in table


def test_targets_are_read_from_the_figures():
    res = {"ceiling": {"byol_bar": 1000.0},
           "model": {"variants": [{"name": "eager", "images_per_sec": 950.0}], "fused_ops": {"share_foreach": 0.03}},
           "peers": {"contenders": [{"name": "fastbyol", "status": "ok", "images_per_sec": 950.0},
                                    {"name": "lightly", "status": "ok", "images_per_sec": 500.0},
                                    {"name": "byol-pytorch", "status": "ok", "images_per_sec": 800.0}]},
           "loader": {"backends": {"ffcv": {"end_to_end_over_model": 0.98}}}}
    got = {what.split(" ")[0]: (value, met) for what, value, met in gpu_suite.targets(res)}
    assert got["fastbyol"] == ("1.19x", "no")  # 950 / 800: the faster peer is the bar
    assert got["model-only"] == ("0.95", "yes")
    assert got["LARS"] == ("3.0%", "no")
    assert got["ffcv:"] == ("0.980", "yes") and got["dali:"] == ("-", "not measured")


def test_ceiling_and_model_figures_hold_their_invariants(tiny_run):
    stages = tiny_run[0]
    ceiling = stages["ceiling"]["result"]
    assert positive(ceiling["images_per_sec"]["eager"]) and "compiled" in ceiling["skipped"]
    assert ceiling["byol_bar"] == pytest.approx(max(ceiling["images_per_sec"].values()) * 3 / 8)
    model = stages["model"]["result"]
    assert [(v["name"], v["batch"]) for v in model["variants"]] == [
        ("eager", 4), ("concat_views", 4), ("ddp 1 rank", 4), ("ddp 1 rank, gradient_as_bucket_view", 4)]
    assert all(v["stride_warnings"] == [] for v in model["variants"][2:])  # channels_last, gloo on a CPU
    for v in model["variants"]:
        assert positive(v["images_per_sec"]) and v["step_ms"] == pytest.approx(1e3 * v["batch"] / v["images_per_sec"])
    fused = model["fused_ops"]
    assert set(fused["lars_ms"]) == {"foreach", "per-param loop"} and set(fused["ema_ms"]) >= {"foreach"}
    for variant in ("foreach", "per-param loop"):  # a part of the step is less than the step
        share = fused[f"share_{variant}"]
        assert share == pytest.approx((fused["lars_ms"][variant] + fused["ema_ms"][variant])
                                      / model["variants"][0]["step_ms"])
        assert positive(share)
    assert fused["ema_params"] < fused["lars_params"]  # the predictor has no target copy
    assert "not checked on cpu" in model["host_syncs"]


def test_peers_and_loader_stages(tiny_run):
    stages = tiny_run[0]
    contenders = {c["name"]: c for c in stages["peers"]["result"]["contenders"]}
    assert set(contenders) == {"fastbyol", "fastbyol-concat", "lightly", "byol-pytorch"}
    assert contenders["fastbyol"]["status"] == "ok" and contenders["fastbyol"]["ratio_to_fastbyol"] == 1.0
    for peer in ("lightly", "byol-pytorch"):
        assert contenders[peer]["status"] in ("ok", "not installed", "not importable")
    loader = stages["loader"]["result"]
    assert loader["images"]["images"] == gpu_suite.TINY.images and loader["images"]["mean_kb"] > 0
    assert set(loader["backends"]) == {"folder", "ffcv"}
    dali = stages["dali"]["result"]
    runs = {**loader["backends"], **dali.get("backends", {})}
    measured = {b: r for b, r in runs.items() if "error" not in r}
    assert "folder" in measured  # the reference path needs no optional package
    for backend, r in measured.items():
        assert all(positive(r[f]) for f in ("loader", "model", "end_to_end")), backend
        assert r["end_to_end_over_model"] == pytest.approx(r["end_to_end"] / r["model"])
        assert r["verdict"] in VERDICTS and r["evidence"]
    for backend, r in runs.items():
        if "error" in r:
            assert backend in ("ffcv", "dali") and r["error"]  # a missing backend says so in one line
    if "ffcv" in measured:
        assert loader["convert"]["exit_code"] == 0 and loader["convert"]["beton_mb"] > 0


def _parts(tmp_path: Path, n_parts: int = 3) -> tuple[Path, bytes]:
    """A real tar holding one file, split into parts + SHA256SUMS as tools/wheelhouse.sh writes them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    payload = tmp_path / "pkg-1.0-py3-none-any.whl"
    payload.write_bytes(bytes(range(256)) * 40)
    tar_path = tmp_path / "dali.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(payload, arcname=payload.name)
    data = tar_path.read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    step = math.ceil(len(data) / n_parts)
    lines = [f"{hashlib.sha256(data).hexdigest()}  dali.tar"]
    for k in range(n_parts):
        chunk = data[k * step:(k + 1) * step]
        (parts / f"dali.tar.part{k}").write_bytes(chunk)
        lines.append(f"{hashlib.sha256(chunk).hexdigest()}  dali.tar.part{k}")
    (parts / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return parts, payload.read_bytes()


def test_dali_parts_are_joined_only_when_complete_and_intact(tmp_path):
    parts, payload = _parts(tmp_path)
    joined = gpu_suite._joined_dali(parts, tmp_path / "into")
    assert joined["status"] == "installed"
    assert [w.read_bytes() for w in joined["wheels"]] == [payload]

    (parts / "dali.tar.part1").unlink()
    missing = gpu_suite._joined_dali(parts, tmp_path / "into2")
    assert missing["status"] == "not installed: 2 of 3 parts in %s (missing dali.tar.part1)" % parts

    parts, _ = _parts(tmp_path / "again")
    (parts / "dali.tar.part2").write_bytes(b"damaged")
    assert "checksum of dali.tar.part2" in gpu_suite._joined_dali(parts, tmp_path / "into3")["status"]
    assert "no " in gpu_suite._joined_dali(tmp_path / "nothing", tmp_path / "into4")["status"]


def _wheel(folder: Path, name: str, tag: str) -> Path:
    """A minimal real wheel: one module `name` that sets VALUE = name."""
    import zipfile

    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": f"VALUE = {name!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_install_targets_a_folder_and_one_refused_wheel_spares_the_others(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    _wheel(house, "alpha", "py3-none-any")
    _wheel(house, "omega", "cp27-cp27m-win32")  # no Python here can install it
    _wheel(house, "fastbyol", "py3-none-any")  # fastbyol runs from the tree, never from the wheelhouse
    site = tmp_path / "work" / "site"
    result = gpu_suite.install(house, tmp_path / "no-parts", site)
    assert result["wheels"] == ["alpha-1.0-py3-none-any.whl"]
    assert list(result["failed"]) == ["omega-1.0-cp27-cp27m-win32.whl"]
    assert "not a supported wheel" in result["failed"]["omega-1.0-cp27-cp27m-win32.whl"]
    assert (site / "alpha.py").read_text() == "VALUE = 'alpha'\n"
    assert not (site / "omega.py").exists() and not (site / "fastbyol.py").exists()
    assert result["dali"].startswith("not installed: no ")


def test_the_newest_record_of_a_stage_wins(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [{"run": "a", "stage": "dali", "status": "ok", "result": {"skipped": "x"}},
            {"run": "a", "stage": "ceiling", "status": "ok", "result": {}},
            {"run": "b", "stage": "dali", "status": "ok", "result": {"backends": {}}}]
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [(r["stage"], r["run"]) for r in gpu_suite.latest_records(results)] == [("ceiling", "a"), ("dali", "b")]
