"""Data sources named in a config: bare names under dataDirectory, paths as written, a missing folder
as one message naming the file, line and key and what to do; the shipped configs and weights name
their sources by name and evaluate finds them with --data-dir."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from test_data import REPO, straight, write
from typer.testing import CliRunner

from model.config import Config, ConfigError, key_location, load_config
from model.data import build_dataset
from model.data.sources import DATA_DIRECTORY_HINT, DataSourceError, is_bare_name, sources_from_config

runner = CliRunner()
SHIPPED = sorted(p.parent.name for p in (REPO / "weights").glob("*/config.txt"))
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("ship_*.txt"))


def data_dir(root: Path, *names: str) -> Path:
    """``root/data`` holding one folder per name, each with one 23-residue PDB chain."""
    for name in names:
        (root / "data" / name).mkdir(parents=True)
        write(root / "data" / name, "one.pdb", straight(23))
    return root / "data"


def test_bare_names_resolve_under_data_directory(tmp_path, monkeypatch):
    data = data_dir(tmp_path, "pdb20", "reseek")
    cfg = Config(dataDirectory=str(data), datasetNames="cgdms, pdb20,reseek")
    assert sources_from_config(cfg) == ["cgdms", str(data / "pdb20"), str(data / "reseek")]
    # a relative dataDirectory starts at the working directory
    monkeypatch.chdir(tmp_path)
    assert sources_from_config(cfg.replace(dataDirectory="data")) == ["cgdms", "data/pdb20", "data/reseek"]
    # a source is named after its folder: the index's `source` column and the ids' prefix
    chains, _ = build_dataset(sources_from_config(Config(datasetNames="pdb20,reseek")), cache_dir=tmp_path / "c",
                              min_length=4, verbose=False)
    assert sorted((c.source, c.id) for c in chains) == [("pdb20", "pdb20:one_A"), ("reseek", "reseek:one_A")]


def test_paths_still_work_relative_to_data_directory_or_absolute(tmp_path, monkeypatch):
    data = data_dir(tmp_path, "pdb20")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    # the form older run directories and checkpoints were written with: a path beside the repository
    old = Config(dataDirectory=".", datasetNames="cgdms,../data/pdb20")
    assert sources_from_config(old) == ["cgdms", "../data/pdb20"]
    assert Path(sources_from_config(old)[1]).resolve() == (data / "pdb20").resolve()
    assert sources_from_config(Config(dataDirectory="elsewhere", datasetNames=str(data / "pdb20"))) == [
        str(data / "pdb20")]
    assert [is_bare_name(e) for e in ("pdb20", "../data/pdb20", "a/b", "/abs/pdb20", "~/pdb20", "..")] == [
        True, False, False, False, False, False]


def test_a_missing_folder_names_the_key_where_it_looked_and_what_to_do(tmp_path):
    data = data_dir(tmp_path, "pdb20")
    with pytest.raises(DataSourceError) as err:
        sources_from_config(Config(dataDirectory=str(data), datasetNames="cgdms,pdb20,reseek"))
    message = str(err.value)
    assert message.startswith("key 'datasetNames': source 'reseek' is not a folder under dataDirectory")
    assert str(data / "reseek") in message and DATA_DIRECTORY_HINT in message and "reseek/" in message
    assert isinstance(err.value, ConfigError) and isinstance(err.value, FileNotFoundError)
    # dataDirectory itself missing; the caller's location and hint
    with pytest.raises(DataSourceError, match=r"^run.txt, line 2, key 'datasetNames': source 'pdb20' is looked "
                                              r"up under dataDirectory 'nowhere', which is not a folder .*; put the "
                                              r"pdb20 folder .* --data-dir X$"):
        sources_from_config(Config(dataDirectory="nowhere", datasetNames="pdb20"),
                            where="run.txt, line 2, key 'datasetNames'", hint="--data-dir X")
    with pytest.raises(DataSourceError, match="source '/nowhere/pdb20' is not a folder; give the path"):
        sources_from_config(Config(datasetNames="/nowhere/pdb20"))


def test_key_location_names_file_line_or_flag(tmp_path):
    cfg = tmp_path / "run.txt"
    cfg.write_text("name x\n# datasetNames in a comment\n  datasetNames pdb20  # a name\n")
    assert key_location(cfg, "datasetNames") == f"{cfg}, line 3, key 'datasetNames'"
    assert key_location(cfg, "dataDirectory") == f"{cfg}, key 'dataDirectory'"
    assert key_location(cfg, "datasetNames", ["datasetNames=a,b"]) == "--set datasetNames=a,b, key 'datasetNames'"
    assert key_location(None, "datasetNames") == "the default config, key 'datasetNames'"


def test_cli_reports_a_missing_folder_and_takes_data_directory_on_the_command_line(tmp_path, monkeypatch):
    from model.cli import app

    monkeypatch.setenv("MHCFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = data_dir(tmp_path / "elsewhere", "pdb20")
    cfg = tmp_path / "run.txt"
    cfg.write_text(f"name src\nlogDirectory {tmp_path / 'runs'}\ndatasetNames pdb20\nminimumNumResidues 4\n")
    for command in (["train", str(cfg)], ["data", "build", "--config", str(cfg)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {cfg}, line 3, key 'datasetNames': source 'pdb20' is looked up "
                                        "under dataDirectory 'data', which is not a folder")
        assert result.output.rstrip().endswith("--set dataDirectory=/path/to/data") and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "build", "--config", str(cfg), "--set", f"dataDirectory={data}"])
    assert result.exit_code == 0, result.output
    index = tmp_path / "runs" / "src" / "training_index.csv"
    assert [row["source"] for row in csv.DictReader(index.open())] == ["pdb20"]


def test_module_and_pack_script_report_a_missing_folder(tmp_path):
    cfg = tmp_path / "run.txt"
    cfg.write_text(f"dataDirectory {tmp_path / 'data'}\ndatasetNames cgdms,pdb20\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in ([sys.executable, "-m", "model.data", "--config", str(cfg)],
                    [sys.executable, str(REPO / "scripts" / "pack_chains.py"), str(cfg), str(tmp_path / "x.npz")]):
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {cfg}, line 2, key 'datasetNames': source 'pdb20'"), done.stderr
        assert "--set dataDirectory=/path/to/data" in done.stderr and "Traceback" not in done.stderr


def test_packed_chains_need_no_sources(tmp_path):
    from model.data import Chain, ProteinDataModule

    def unit(v):  # [L, 3] -> unit vectors: 3.8 A steps, no chain break
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    rng = np.random.default_rng(0)
    chains = [Chain(id=f"pdb20:c{i}_A", sequence="".join(rng.choice(list("ACDEFGHIKL"), 30)),
                    ca=np.cumsum(3.8 * unit(rng.normal(size=(30, 3))), axis=0).astype(np.float32),
                    residue_index=np.arange(30, dtype=np.int32), source="pdb20") for i in range(6)]
    dm = ProteinDataModule(Config(dataDirectory=str(tmp_path / "none"), datasetNames="pdb20", batchSize=2),
                           chains=chains, verbose=False)  # the folder is missing: not needed
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 6


@pytest.mark.parametrize("path", SHIPPED_CONFIGS + [REPO / "weights" / n / "config.txt" for n in SHIPPED],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_name_their_sources_by_name(path):
    cfg = load_config(path)
    entries = cfg.datasetNames.split(",")
    assert entries[0] == "cgdms" and all(is_bare_name(e) for e in entries), cfg.datasetNames
    assert cfg.dataDirectory == Config().dataDirectory  # the default; a machine sets its own


@pytest.mark.parametrize("name", SHIPPED)
def test_evaluate_finds_the_shipped_weights_sources_with_data_dir(name, tmp_path, monkeypatch):
    from model.evaluation import cli

    monkeypatch.chdir(tmp_path)
    weights = REPO / "weights" / name
    own = weights / "training_index.csv"
    index = own if own.is_file() else REPO / "weights" / "training_index.csv"
    with pytest.raises(typer.Exit):  # no data folder here: one message, exit 2
        cli.default_real_and_index(weights, None, index)
    names = load_config(weights / "config.txt").datasetNames.split(",")
    data = data_dir(tmp_path / "any", *names[1:])
    sources, got_index, note = cli.default_real_and_index(weights, None, index, data)
    assert got_index == index and sources == ["cgdms", *(str(data / n) for n in names[1:])]
    assert f"real sources from {weights / 'config.txt'}" in note
    # the index spells its sources as the folders are named, so its ids resolve against them
    assert {row["source"] for row in csv.DictReader(index.open())} == set(names)


def test_evaluate_missing_folder_message_names_the_weights_config_and_data_dir(tmp_path, capsys, monkeypatch):
    from model.evaluation import cli

    monkeypatch.chdir(tmp_path)
    weights = REPO / "weights" / "mhc_flash_pairfree_v1"
    result = runner.invoke(cli.evaluate_app, [str(weights), "--data-dir", str(tmp_path), "-l", "24"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert out.startswith(f"error: {weights / 'config.txt'}, line 6, key 'datasetNames' with --data-dir {tmp_path}: "
                          f"source 'pdb20' is not a folder under dataDirectory '{tmp_path}'")
    assert out.endswith("--data-dir /path/to/data (or name the sources with --real)")
    result = runner.invoke(cli.evaluate_app, [str(weights), "--data-dir", str(tmp_path), "--real", "cgdms"])
    assert result.exit_code == 2 and "--real names the sources itself" in result.output
