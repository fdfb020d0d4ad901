"""Config files: _base_ inheritance, overrides, and errors that name the key path and the file."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from asymret.api.cli import main
from asymret.config import dump_config, load_config
from asymret.errors import ConfigError
from asymret.training.config import ExperimentConfig


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "_base_/root.yaml", """
        seed: 1
        train: {epochs: 10, optim: {lr: 0.001, optimizer: sgd}}
        loss: {name: contrastive, params: {margin: 0.7}}
    """)
    write(tmp_path / "_base_/pair.yaml", """
        _base_: root.yaml
        query_net: {backbone: mobilenetv2_100, dim: 512}
        train: {optim: {lr: 0.01}}
    """)
    return write(tmp_path / "exp/leaf.yaml", """
        _base_: ../_base_/pair.yaml
        name: leaf
        loss: {name: contr_plus}
    """)


def test_bases_merge_over_several_levels_with_relative_paths(tree):
    cfg = load_config(tree, model=ExperimentConfig)
    assert cfg.name == "leaf" and cfg.seed == 1
    assert cfg.train.epochs == 10 and cfg.train.optim.lr == 0.01 and cfg.train.optim.optimizer == "sgd"
    assert cfg.loss.name == "contr_plus" and cfg.loss.params == {"margin": 0.7}  # mappings merge
    assert cfg.query_net.backbone == "mobilenetv2_100" and cfg.query_net.dim == 512


def test_overrides_parse_yaml_values_and_win(tree):
    cfg = load_config(tree, ["train.optim.lr=3e-4", "train.amp=false", "query_net.input.scales=[1, 0.5]",
                             "loss.params.margin=0.85"], ExperimentConfig)
    assert cfg.train.optim.lr == 3e-4 and cfg.train.amp is False
    assert cfg.query_net.input.scales == (1.0, 0.5) and cfg.loss.params["margin"] == 0.85


def test_delete_replaces_an_inherited_mapping(tmp_path, tree):
    leaf = write(tmp_path / "exp/reset.yaml", """
        _base_: leaf.yaml
        loss: {_delete_: true, name: triplet}
    """)
    assert load_config(leaf, model=ExperimentConfig).loss.params == {}


def test_unknown_key_names_path_and_file(tmp_path, tree):
    bad = write(tmp_path / "exp/typo.yaml", """
        _base_: leaf.yaml
        train: {optim: {lrr: 0.1}}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(bad, model=ExperimentConfig)
    assert "train.optim.lrr" in str(err.value) and "typo.yaml" in str(err.value)


def test_wrong_type_names_path_and_origin(tree):
    with pytest.raises(ConfigError) as err:
        load_config(tree, ["train.epochs=many"], ExperimentConfig)
    assert "train.epochs" in str(err.value) and "command line" in str(err.value)
    with pytest.raises(ConfigError, match=r"train.optim.lr.*pair.yaml|pair.yaml.*train.optim.lr"):
        write(tree.parent.parent / "_base_/pair.yaml", "_base_: root.yaml\ntrain: {optim: {lr: -1}}\n")
        load_config(tree, model=ExperimentConfig)


def test_missing_files_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    a = write(tmp_path / "a.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*not found"):
        load_config(a)
    write(tmp_path / "b.yaml", "_base_: c.yaml\n")
    c = write(tmp_path / "c.yaml", "_base_: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(c)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(write(tmp_path / "ok.yaml", "seed: 1\n"), ["novalue"])


def test_dump_round_trips(tree, tmp_path):
    cfg = load_config(tree, model=ExperimentConfig)
    again = write(tmp_path / "resolved.yaml", dump_config(cfg))
    assert load_config(again, model=ExperimentConfig) == cfg


def test_cli_prints_resolved_config_and_errors_without_traceback(tree, capsys):
    assert main(["config", str(tree), "seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 7 and printed["loss"]["name"] == "contr_plus"
    assert main(["config", str(tree), "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'train.nope'") and "Traceback" not in err
