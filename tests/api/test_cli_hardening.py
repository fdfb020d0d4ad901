"""Issue 14, item 7: the CLI as a new user meets it. Every option has help; a closed pipe ends
quietly; read-only commands create nothing; a truncated .pt is one typed line everywhere; a second
``train`` does not replace the first run; a corrupt image can be skipped and an unfinished add
aborted; a rerun of an add adds nothing twice; snapshots round-trip through the CLI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from asymret.api.cli import build_parser, main
from asymret.errors import DataError
from asymret.index import GalleryStore
from asymret.retrieval.checkpoints import load_torch_file
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.pair import save_pair
from asymret.retrieval.specs import EncoderSpec, InputSpec

ROOT = Path(__file__).resolve().parents[2]


def undocumented(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from undocumented(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_of_every_subcommand_has_help():
    assert list(undocumented(build_parser(), "asymret")) == []


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    torch.manual_seed(0)
    query_net = create_encoder(EncoderSpec(backbone="mobilenetv2_050", dim=8, input=InputSpec(size=32)))
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=8, input=InputSpec(size=32)))
    return save_pair(tmp_path_factory.mktemp("pair") / "pair.pt", query_net, gallery_net)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (folder / f"id{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"id{c}" / f"{i}.png")
    return folder


def truncated(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def test_a_closed_pipe_ends_with_141_and_no_traceback(tmp_path):
    with GalleryStore(tmp_path) as store:
        for i in range(3):
            store.create(f"g{i}", 4).close()
    read, write = os.pipe()
    os.close(read)  # the reader (head -1) is gone before anything is written
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "asymret", "index", "list", "--root", str(tmp_path)],
                          stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300, check=False)
    os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_read_only_commands_create_nothing(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    for argv in (["list"], ["info", "--name", "g"], ["search", "--name", "g", "--vector", tmp_path / "v.npy"]):
        status, _, err = cli(capsys, "index", *argv, "--root", missing)
        assert status == 2 and err.startswith("error: no galleries folder") and err.count("\n") == 1
    assert not missing.exists()


def test_a_truncated_pt_file_is_one_typed_line(pair_file, images, tmp_path, capsys):
    bad = truncated(pair_file, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="is not a complete checkpoint .truncated or corrupt.."):
        load_torch_file(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a complete checkpoint"):
        load_torch_file(empty)
    for argv in (["index", "build", "--name", "g", "--root", tmp_path / "gal", "--pair", bad, "--images", images,
                  "--workers", 0],
                 ["evaluate", "--pair", bad, "--benchmark", "mini-roxford", "--root", tmp_path / "none"],
                 ["serve", "--pair", bad, "--galleries", tmp_path / "gal"]):
        status, _, err = cli(capsys, *argv)
        assert status == 2, argv
        assert err.startswith(f"error: {bad} is not a complete checkpoint (truncated or corrupt?)"), err
        assert err.count("\n") == 1


def train_config(tmp_path: Path, images: Path) -> Path:
    cfg = {"name": "run", "seed": 3, "output_dir": str(tmp_path / "runs"),
           "query_net": {"backbone": "mobilenetv2_035", "dim": 8, "input": {"size": 32}},
           "gallery_net": {"backbone": "resnet10t", "dim": 8, "input": {"size": 32}},
           "data": {"format": "folder", "root": str(images), "num_workers": 0},
           "loss": {"name": "contr_plus"},
           "train": {"epochs": 1, "batch_size": 2, "optim": {"lr": 1e-3},
                     "mining": {"tuples_per_epoch": 2, "num_negatives": 1, "pool_size": 4}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_twice_refuses_and_a_truncated_last_pt_is_one_line(images, tmp_path, capsys):
    cfg = train_config(tmp_path, images)
    assert cli(capsys, "train", cfg, "--no-progress")[0] == 0
    run = tmp_path / "runs" / "run"
    first = (run / "metrics.jsonl").read_text()
    status, _, err = cli(capsys, "train", cfg, "--no-progress")
    assert status == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == first  # the first run is untouched
    truncated(run / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    status, _, err = cli(capsys, "train", cfg, "train.epochs=2", "--resume", "--no-progress")
    assert status == 2 and "is not a complete checkpoint (truncated or corrupt?)" in err and err.count("\n") == 1
    assert cli(capsys, "train", cfg, "--overwrite", "--no-progress")[0] == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def count(root: Path, name: str) -> tuple[int, list]:
    with GalleryStore(root) as store, store.open(name, readonly=True) as gallery:
        paths = [item.path for item in gallery.get(gallery.index.ids())]
        return len(gallery), paths


def test_add_skips_bad_images_on_request_aborts_and_never_adds_twice(pair_file, images, tmp_path, capsys):
    root = tmp_path / "gal"
    common = ["--root", root, "--pair", pair_file, "--workers", 0, "--shard-size", 2]
    first = images / "id0"
    assert cli(capsys, "index", "build", "--name", "g", "--images", first, *common)[0] == 0
    status, out, _ = cli(capsys, "index", "add", "--name", "g", "--images", first, *common)
    assert status == 0 and "0 added" in out and "skipped 3 already in the gallery" in out
    assert count(root, "g")[0] == 3

    (images / "id1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    status, _, err = cli(capsys, "index", "add", "--name", "g", "--images", images, *common)
    assert status == 2 and "does not decode" in err and "--skip-bad" in err and "index abort g" in err
    before = count(root, "g")
    status, out, _ = cli(capsys, "index", "info", "--name", "g", "--root", root)
    assert "unfinished add" in out and "asymret index abort g" in out
    status, out, _ = cli(capsys, "index", "abort", "g", "--root", root)
    assert status == 0 and "dropped the unfinished add" in out
    assert count(root, "g") == before  # nothing committed was lost
    assert cli(capsys, "index", "add", "--name", "g", "--images", images, *common)[0] == 2  # stopped again
    # --skip-bad plans the stopped add again, without the bad image
    status, out, _ = cli(capsys, "index", "add", "--name", "g", "--images", images, "--skip-bad", *common)
    assert status == 0 and "3 added" in out and "3 already in the gallery, 1 undecodable" in out
    n, paths = count(root, "g")
    assert n == 6 and len(set(paths)) == 6 and not any(p.endswith("bad.png") for p in paths)
    assert cli(capsys, "index", "abort", "g", "--root", root)[1].startswith("gallery 'g' has no unfinished")

    # same path, other bytes: a new version, added as a new item (the old one stays)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(images / "id0" / "0.png")
    status, out, _ = cli(capsys, "index", "add", "--name", "g", "--images", first, *common)
    assert status == 0 and "1 added" in out
    assert count(root, "g")[0] == 7


def test_snapshot_and_restore_through_the_cli(pair_file, images, tmp_path, capsys):
    root = tmp_path / "gal"
    assert cli(capsys, "index", "build", "--name", "g", "--images", images, "--root", root, "--pair", pair_file,
               "--workers", 0)[0] == 0
    status, out, _ = cli(capsys, "index", "snapshot", "g", tmp_path / "snap", "--root", root)
    assert status == 0 and "6 items" in out
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["count"] == 6
    status, _, err = cli(capsys, "index", "restore", tmp_path / "snap", "--root", root)
    assert status == 2 and "already exists" in err and "--name NEW" in err
    other = tmp_path / "other"
    assert cli(capsys, "index", "restore", tmp_path / "snap", "--root", other, "--name", "copy")[0] == 0
    vector = tmp_path / "q.npy"
    np.save(vector, np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32))
    hits = [json.loads(cli(capsys, "index", "search", "--name", name, "--root", where, "--vector", vector,
                           "--json")[1])["results"][0]["hits"] for name, where in (("g", root), ("copy", other))]
    assert [(h["id"], h["path"], round(h["score"], 5)) for h in hits[0]] == \
           [(h["id"], h["path"], round(h["score"], 5)) for h in hits[1]]
    shutil.rmtree(tmp_path / "snap")
