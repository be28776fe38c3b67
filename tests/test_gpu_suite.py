"""The GPU suite cannot rot between GPU rounds: `python -m benchmarks.gpu_suite run all --device cpu
--tiny` goes through every stage of runs A and B here, and its records are checked for structure and
for invariants between figures (never for speed); DALI's parts are joined only when all are there
and their checksums match; the records of two runs read as one table.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from torch import nn

from benchmarks.suite import records
from benchmarks.suite.install import install, joined_dali
from benchmarks.suite.model import DDP_LABEL, SWEEP_FILE
from benchmarks.suite.sizes import TINY
from benchmarks.suite.stages import RUNS
from benchmarks.suite.table import markdown, targets
from fastbyol.config import load_config
from fastbyol.verdict import VERDICTS
from fastbyol.step import build_model

ROOT = Path(__file__).resolve().parents[1]
SUITE = [sys.executable, "-m", "benchmarks.gpu_suite"]


def _suite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SUITE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = _suite("run", "all", "--device", "cpu", "--tiny", "--out", str(out), "--work", str(work),
                  "--wheelhouse", str(work / "no-wheelhouse"), "--dali-parts", str(work / "no-dali-parts"),
                  "--budget-scale", "8", "--total", "7200",  # a loaded CI machine must not turn a stage into a timeout
                  timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = records.read([out / records.RESULTS])
    final = {r["stage"]: r for r in lines if r["status"] != records.RUNNING}
    return final, lines, out, proc.stdout


def positive(x: float) -> bool:
    return x > 0 and math.isfinite(x)


def test_every_stage_of_both_runs_runs_and_records_itself(tiny_run):
    final, _, out, printed = tiny_run
    assert list(final) == ["install all", *RUNS["A"], *RUNS["B"]]
    for name, r in final.items():
        assert set(r) == set(records.KEYS), name
        assert r["status"] == "ok", (name, r["error"])
        assert 0 <= r["seconds"] <= r["budget_s"] + 5 or name.startswith("install"), name
    assert len({r["run"] for r in final.values()}) == 1
    install_result = final["install all"]["result"]
    assert install_result["wheels"] == [] and "no wheels" in install_result["note"]
    assert install_result["dali"].startswith("not installed")
    env = final["environment"]["result"]
    assert env["gpu"] == "cpu" and env["cpu_count"] >= 1 and env["imports_torchvision"]
    table = (out / "results.md").read_text()
    assert table in printed
    for stage in final:
        assert f"| {stage} | {final[stage]['run']} | ok |" in table
    assert "| fastbyol / the faster peer >= 1.3 (peers stage, same run) |" in table


def test_figures_are_saved_the_moment_they_are_measured(tiny_run):
    """The model stage saves after each variant: its first save holds the eager figure alone, and
    every save comes before the stage's final line."""
    _, lines, _, _ = tiny_run
    model = [r for r in lines if r["stage"] == "model"]
    assert [r["status"] for r in model[:-1]] == [records.RUNNING] * (len(model) - 1) and model[-1]["status"] == "ok"
    assert [v["name"] for v in model[0]["result"]["variants"]] == ["eager"]
    assert model[-1]["result"] == model[-2]["result"]  # the final line carries the newest save


def test_a_stage_past_its_budget_is_stopped_and_the_run_goes_on(tmp_path):
    """Budgets far below a Python start-up with torch: every stage is killed, each is recorded, and
    with the run's time spent the rest are recorded as skipped."""
    def run(*extra: str) -> list[dict]:
        proc = _suite("run", "A", "--device", "cpu", "--tiny", "--out", str(tmp_path / "out"),
                      "--work", str(tmp_path / "work"), "--wheelhouse", str(tmp_path / "none"),
                      "--dali-parts", str(tmp_path / "none"), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return records.read([tmp_path / "out" / records.RESULTS])

    got = run("--stages", "environment,ceiling", "--budget-scale", "0.01")
    assert [(r["stage"], r["status"], r["result"]) for r in got[1:]] == [
        ("environment", "timeout", None), ("ceiling", "timeout", None)]
    assert all(r["seconds"] < r["budget_s"] + 2 and "budget" in r["error"] for r in got[1:])
    got = run("--stages", "model", "--total", "0")
    assert got[-1]["stage"] == "model" and got[-1]["status"].startswith("skipped")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| environment | A " in table and "| timeout |" in table and "| model | A " in table


def test_bad_arguments_get_one_line_and_exit_code_2(tmp_path):
    proc = _suite("run", "A", "--stages", "model,warp", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--stages: unknown warp" in proc.stderr
    proc = _suite("report", str(tmp_path / "nothing.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_targets_are_read_from_the_figures():
    res = {"ceiling": {"images_per_sec": 2000.0}, "ceiling_compiled": {"images_per_sec": 2400.0},
           "model": {"variants": [{"name": "eager", "images_per_sec": 855.0}]}, "fused": {"share_foreach": 0.03},
           "peers": {"contenders": [{"name": "fastbyol", "status": "ok", "images_per_sec": 950.0},
                                    {"name": "lightly", "status": "ok", "images_per_sec": 500.0},
                                    {"name": "byol-pytorch", "status": "ok", "images_per_sec": 800.0}]},
           "loader": {"backends": {"ffcv": {"end_to_end_over_model": 0.98}}}}
    got = {what.split(" ")[0]: (value, met) for what, value, met in targets(res)}
    assert got["fastbyol"] == ("1.19x", "no")  # 950 / 800: the faster peer is the bar
    assert got["model-only"] == ("0.95", "yes")  # 855 / (3/8 of the faster ceiling, 2400)
    assert got["LARS"] == ("3.0%", "no")
    assert got["ffcv:"] == ("0.980", "yes") and got["dali:"] == ("-", "not measured")


def test_ceiling_model_and_ddp_figures_hold_their_invariants(tiny_run):
    final = tiny_run[0]
    ceiling = final["ceiling"]["result"]
    assert positive(ceiling["images_per_sec"]) and ceiling["variant"] == "eager"
    assert ceiling["byol_bar"] == pytest.approx(ceiling["images_per_sec"] * 3 / 8)
    compiled = final["ceiling_compiled"]["result"]
    assert compiled["compile_backend"] == "aot_eager" and compiled["byol_bar"] == pytest.approx(
        compiled["images_per_sec"] * 3 / 8)
    variants = [v for stage in ("model", "ddp", "compile") for v in final[stage]["result"]["variants"]]
    assert [(v["name"], v["batch"]) for v in variants] == [
        ("eager", 4), ("concat_views", 4), ("ddp 1 rank", 4), ("ddp 1 rank, gradient_as_bucket_view", 4),
        ("compile", 4)]
    for v in variants:
        assert positive(v["images_per_sec"]) and v["step_ms"] == pytest.approx(1e3 * v["batch"] / v["images_per_sec"])
    assert variants[-1]["overrides"] == ["model.compile=true", "model.compile_backend=aot_eager"]
    assert 0 < variants[-1]["compile_seconds"]  # the first step's wall time, saved before the windows
    assert "CUDA graphs need CUDA" in final["cudagraphs"]["result"]["skipped"]
    assert all(v["stride_warnings"] == [] for v in variants[2:4])  # channels_last, gloo on a CPU
    assert final["ddp"]["result"]["label"] == DDP_LABEL and "SyncBN not measured" in DDP_LABEL
    assert f"| {DDP_LABEL} | ddp 1 rank | 4 |" in (tiny_run[2] / "results.md").read_text()
    assert "not checked on cpu" in final["model"]["result"]["host_syncs"]


def test_lars_and_ema_share_is_taken_against_the_model_stages_eager_step(tiny_run):
    final = tiny_run[0]
    fused = final["fused"]["result"]
    eager = final["model"]["result"]["variants"][0]
    assert fused["eager_step_ms"] == eager["step_ms"]  # the figure of another stage of the same run
    for variant in ("foreach", "per-param loop"):
        assert fused[f"share_{variant}"] == pytest.approx(
            (fused["lars_ms"][variant] + fused["ema_ms"][variant]) / eager["step_ms"])
    cfg = load_config(None, ["data.backend=synthetic", "model.depth=18", "byol.hidden_dim=32", "byol.proj_dim=16"])
    byol = build_model(cfg)
    online = nn.ModuleList([byol.online_encoder, byol.online_projector, byol.predictor])
    weights = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in online.modules())
    assert fused["lars_launches"]["tensors"] == [weights, sum(1 for _ in online.parameters()) - weights]
    assert fused["lars_launches"]["cuda_kernels"] is None  # counted on CUDA only


def test_augmentation_compile_figures_are_recorded_per_policy(tiny_run):
    final, _, out, _ = tiny_run
    aug = final["augment"]["result"]
    assert (aug["batch"], aug["size"], aug["backend"]) == (TINY.batch, TINY.size, "aot_eager")
    for view in ("view1", "view2"):
        a = aug[view]
        assert a["speedup"] == pytest.approx(a["eager_ms"] / a["compiled_ms"])
        assert a["max_abs_diff"] < 1e-5  # aot_eager runs the same ops: the same views
        assert f"| view augmentation, eager vs torch.compile | {view} | {TINY.batch} |" in (out / "results.md").read_text()


def test_step_time_against_batch_is_written_as_it_is_measured(tiny_run):
    final, _, out, _ = tiny_run
    points = final["sweep"]["result"]["points"]
    assert [p["batch"] for p in points] == list(TINY.sweep_batches)
    written = [json.loads(line) for line in (out / SWEEP_FILE).read_text().splitlines()]
    assert written == points
    for p in points:
        assert p["error"] is None and p["step_time_s"] * p["images_per_sec"] == pytest.approx(p["batch"])


@pytest.mark.backends
def test_peers_and_loader_stages(tiny_run):
    final = tiny_run[0]
    contenders = {c["name"]: c for c in final["peers"]["result"]["contenders"]}
    assert set(contenders) == {"fastbyol", "fastbyol-concat", "lightly", "byol-pytorch"}
    assert contenders["fastbyol"]["status"] == "ok" and contenders["fastbyol"]["ratio_to_fastbyol"] == 1.0
    for peer in ("lightly", "byol-pytorch"):
        assert contenders[peer]["status"] in ("ok", "not installed", "not importable")
    loader = final["loader"]["result"]
    assert loader["images"]["images"] == TINY.images and loader["images"]["mean_kb"] > 0
    assert set(loader["backends"]) == {"folder", "ffcv"}  # measured, or the reason it is not
    dali = final["dali"]["result"]
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


def test_the_records_of_two_runs_read_as_one_table(tiny_run, tmp_path):
    """A's and B's results.jsonl, from two commands, give one table: each stage's newest record."""
    _, lines, _, _ = tiny_run
    a, b = tmp_path / "A.jsonl", tmp_path / "B.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in lines if r["stage"] not in RUNS["B"]))
    b.write_text("".join(json.dumps(r) + "\n" for r in lines if r["stage"] in RUNS["B"]))
    proc = _suite("report", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    from benchmarks.suite.runner import ORDER

    assert proc.stdout == markdown(records.latest(lines, ORDER))
    assert "| dali | all " in proc.stdout and "| ceiling | all " in proc.stdout


def test_a_last_line_cut_short_by_a_killed_command_is_left_out(tmp_path):
    whole = records.record("A 1", "model", records.RUNNING, 1.0, 50.0, {"variants": []})
    path = tmp_path / records.RESULTS
    records.append(path, whole)
    records.append(path, {**whole, "status": "ok"})
    path.write_text(path.read_text()[:-20])  # the second line, half written
    assert records.read([path]) == [whole]
    path.write_text(path.read_text() + "\n" + json.dumps(whole) + "\n")  # damage before the last line is an error
    with pytest.raises(json.JSONDecodeError):
        records.read([path])


def test_the_newest_record_of_a_stage_wins(tmp_path):
    rows = [{"run": "a", "stage": "dali", "status": "ok", "result": {"skipped": "x"}},
            {"run": "a", "stage": "ceiling", "status": "ok", "result": {}},
            {"run": "b", "stage": "dali", "status": "ok", "result": {"backends": {}}}]
    assert [(r["stage"], r["run"]) for r in records.latest(rows, ["ceiling", "dali"])] == [("ceiling", "a"),
                                                                                            ("dali", "b")]


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
    joined = joined_dali(parts, tmp_path / "into")
    assert joined["status"] == "installed"
    assert [w.read_bytes() for w in joined["wheels"]] == [payload]

    (parts / "dali.tar.part1").unlink()
    missing = joined_dali(parts, tmp_path / "into2")
    assert missing["status"] == "not installed: 2 of 3 parts in %s (missing dali.tar.part1)" % parts

    parts, _ = _parts(tmp_path / "again")
    (parts / "dali.tar.part2").write_bytes(b"damaged")
    assert "checksum of dali.tar.part2" in joined_dali(parts, tmp_path / "into3")["status"]
    assert "no " in joined_dali(tmp_path / "nothing", tmp_path / "into4")["status"]


def _wheel(folder: Path, name: str, tag: str, files: dict[str, str] | None = None) -> Path:
    """A minimal real wheel: module `name` (VALUE = name), plus `files` (path -> text)."""
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": f"VALUE = {name!r}\n", **(files or {}),
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
    result = install(house, tmp_path / "no-parts", site)
    assert result["wheels"] == ["alpha-1.0-py3-none-any.whl"]
    assert list(result["failed"]) == ["omega-1.0-cp27-cp27m-win32.whl"]
    assert "not a supported wheel" in result["failed"]["omega-1.0-cp27-cp27m-win32.whl"]
    assert (site / "alpha.py").read_text() == "VALUE = 'alpha'\n"
    assert not (site / "omega.py").exists() and not (site / "fastbyol.py").exists()
    assert result["dali"].startswith("not installed: no ")


def test_a_wheels_shared_libraries_reach_the_stages_library_path(tmp_path):
    """nvidia-nvjpeg puts libnvjpeg.so.13 in nvidia/cu13/lib, which nvImageCodec finds by soname:
    the stages' LD_LIBRARY_PATH must name that folder of the install target."""
    from benchmarks.suite.install import library_path

    house = tmp_path / "house"
    house.mkdir()
    _wheel(house, "nvjpeg_like", "py3-none-any", {"nvidia/cu13/lib/libnvjpeg.so.13": "not a real library"})
    site = tmp_path / "site"
    install(house, tmp_path / "no-parts", site)
    assert library_path(site) == [str(site / "nvidia" / "cu13" / "lib")]
    assert (site / "nvidia" / "cu13" / "lib" / "libnvjpeg.so.13").exists()
