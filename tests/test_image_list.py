"""pipelines.image_list under torch.distributed: 2 gloo processes on the CPU share the decoding
of the file check (each file decoded by exactly one rank, counted per rank) and get the same
list, equal to the one a single process computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image

WORLD = 2


def _verify_on_rank(rank: int, folder: str, cache: str, out: str) -> None:
    """One rank: verify the folder's images twice (cold cache, then warm), counting decodes."""
    import os
    import warnings

    import torch.distributed as dist

    os.environ["FASTBYOL_CACHE"] = cache
    import pipelines.image_list as image_list

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    decoded: list[str] = []
    real = image_list.inspect_image
    image_list.inspect_image = lambda p: decoded.append(p) or real(p)
    paths = sorted(str(p) for p in Path(folder).rglob("*.png"))
    answers = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            listed = image_list.verify_images(paths, list(range(len(paths))), "skip", 2, name=folder)
        answers.append({"decoded": list(decoded), "list": [listed.paths, listed.labels, listed.heights,
                                                            listed.widths, listed.skipped]})
        decoded.clear()
    Path(out, f"rank{rank}.json").write_text(json.dumps(answers))
    dist.destroy_process_group()


@pytest.fixture()
def folder(tmp_path) -> Path:
    """9 PNGs of different sizes and a file named .png that is not one."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (10 + i, 20 - i, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "9.png").write_text("not an image")
    return root


def test_two_ranks_share_the_decoding_and_get_the_same_list(folder, tmp_path, monkeypatch):
    import pipelines.image_list as image_list

    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    mp.spawn(_verify_on_rank, args=(str(folder), str(cache), str(out)), nprocs=WORLD)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    paths = sorted(str(p) for p in folder.glob("*.png"))
    cold = [r[0]["decoded"] for r in ranks]
    assert sorted(cold[0] + cold[1]) == paths  # every file decoded once, by one rank
    assert cold[0] and cold[1]  # the work was shared
    assert [r[1]["decoded"] for r in ranks] == [[], []]  # then the cache answers
    # the same list on both ranks, both times, equal to what one process computes
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "single"))
    with pytest.warns(image_list.BadImageWarning, match="9.png"):
        single = image_list.verify_images(paths, list(range(len(paths))), "skip", 1, name=str(folder))
    want = json.loads(json.dumps([single.paths, single.labels, single.heights, single.widths, single.skipped]))
    assert all(answer["list"] == want for r in ranks for answer in r)
    assert want[2] == [10 + i for i in range(9)] and len(want[4]) == 1
