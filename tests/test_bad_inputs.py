"""Every bad input a user tried, through the command line: one clear line, a non-zero exit, no
traceback, and nothing stored or changed in the lake.

``BAD_INPUTS`` is the table: command-line arguments (``{M}`` etc. name artifacts of the small
lake below, ``{F}`` the folder of the test's files) and a regular expression the error line
must match. Click's own usage errors print ``Usage:`` / ``Try ...`` lines before their one
error line; those are allowed.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.lake import open_lake
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.npeff.compute_pefs import run_pefs
from curvlake.pipelines.npeff.fit import run_npeff_fit
from curvlake.pipelines.runs import export_state_dict, import_run
from curvlake.pipelines.train import run_train

TINY = {"epochs": 1, "device": "cpu", "batch_size": 256}

BAD_INPUTS = [
    # -- train: files, options, model parameters, data, device ---------------------------------
    ("train --config {F}/bad.yaml", r"bad\.yaml: not valid YAML at line 2"),
    ("train --config {F}/list.yaml", r"must hold a mapping of options"),
    ("train --config {F}/nofile.yaml", r"no such file: .*nofile\.yaml"),
    ("train --config {F}", r"is a directory"),
    ("train --grid {F}/list.yaml", r"grid file .* must hold a mapping"),
    ("train --device cuda:99", r"device='cuda:99' is not valid"),
    ("train --device tpu", r"device='tpu' \(allowed: auto, cpu, cuda, cuda:N, mps\)"),
    ("train --set epochs=abc", r"epochs='abc' \(allowed: an int >= 0\)"),
    ("train --set batch_size=1.5", r"batch_size=1\.5 \(allowed: an int >= 1\)"),
    ("train --set lr=abc", r"training option 'lr' = 'abc' is not a number"),
    ("train --set nokey=1", r"unknown training option\(s\) 'nokey'; valid options: model,"),
    (
        "train --set save_epochs=[99] --epochs 1",
        r"save_epochs=\(99,\) \(allowed: a list of ints in 0\.\.1\)",
    ),
    ("train --set epochs", r"'epochs' is not KEY=VALUE"),
    ("train --param nokey=1", r"unknown parameter\(s\) 'nokey' for model 'mlp'"),
    ("train --model cnn5_k --param widths=[8]", r"'widths' for model 'cnn5_k'; valid parameters"),
    ("train --model nomodel", r"model='nomodel' \(allowed: mlp, "),
    ("train --epochs -1", r"Invalid value for '--epochs'"),
    ("train --lr 0", r"Invalid value for '--lr'"),
    ("train --label-noise 2", r"Invalid value for '--label-noise'"),
    ("train --dataset {F}/nan.npz", r"x has 80 NaN or infinite value\(s\)"),
    ("train --dataset {F}/nox.npz", r"must hold arrays 'x' and 'y'"),
    ("train --dataset {F}/nofile.npz", r"dataset file .*nofile\.npz does not exist"),
    ("train --dataset foo", r"dataset='foo' \(allowed: digits, "),
    ("train --dataset dataset-0123456789abcdef", r"no artifact 'dataset-0123456789abcdef'"),
    ("train --data-dir {F}", r"--data-dir does not apply to --dataset digits"),
    # -- ids: not an id, a path, the wrong kind, absent ----------------------------------------
    ("lake show ../run/{M}", r"'\.\./run/run-[0-9a-f]{{16}}' is not an artifact id"),
    ("lake show {M}/..", r"is not an artifact id"),
    ("lake show run-0123456789ABCDEF", r"is not an artifact id"),
    ("lake show nonexistent", r"'nonexistent' is not an artifact id"),
    ("lake show run-0123456789abcdef", r"no artifact 'run-0123456789abcdef' in lake"),
    ("lake validate ../run/{M}", r"is not an artifact id"),
    ("lake validate run-0123456789abcdef", r"no artifact 'run-0123456789abcdef'"),
    ("lake rm ../run/{M} -y", r"is not an artifact id"),
    ("lake rm {M} -y", r"is an input of .*--recursive"),
    ("lake ls --kind nokind", r"unknown artifact kind 'nokind'"),
    ("stats plot {P}", r"{P} is a pefs artifact.*jacobian_stats"),
    ("stats plot {M}", r"{M} is a run artifact.*jacobian_stats"),
    ("runs export {P} {F}/x.pt", r"{P} is a pefs artifact.*run"),
    ("runs export ../run/{M} {F}/x.pt", r"is not an artifact id"),
    ("npeff top {M}", r"{M} is a run artifact.*npeff"),
    ("npeff perturb {M}", r"{M} is a run artifact.*npeff"),
    ("npeff sparsify {M} --threshold 0.1", r"{M} is a run artifact.*npeff"),
    ("npeff coeffs {P} --pefs {P}", r"{P} is a pefs artifact.*npeff"),
    ("npeff fit --pefs {M} --components 2", r"{M} is a run artifact.*pefs"),
    ("pefs compute --run {P}", r"{P} is a pefs artifact.*run"),
    ("pefs compute --run nonexistent", r"'nonexistent' is not an artifact id"),
    ("pefs dsf --run {P}", r"{P} is a pefs artifact.*run"),
    ("pefs filter {M} --labels 1", r"{M} is a run artifact.*pefs"),
    ("stats compute --run {P}", r"{P} is a pefs artifact.*run"),
    ("mask show {N}", r"{N} is a npeff artifact.*mask"),
    ("mask magnitude --run {P} --size 3", r"{P} is a pefs artifact.*run"),
    ("pefs compute --run {W}", r"imported from .* without a dataset"),
    # -- output paths, checked before the work -------------------------------------------------
    ("runs export {M} {F}/nodir/x.pt", r"cannot write .*x\.pt: folder .*nodir does not exist"),
    ("runs export {M} {F}", r"is a directory"),
    ("npeff top {N} --out {F}/nodir/x.png", r"cannot write .*x\.png: folder .*nodir does not"),
    ("npeff top {N} --out {F}/x.txt", r"cannot write .*x\.txt: the file name must end in \.png"),
    ("stats plot {S} --out {F}/nodir/x.png", r"cannot write .*x\.png: folder .*nodir does not"),
    ("stats plot {S} --out {F}/x.txt", r"the file name must end in \.png, \.pdf, \.svg"),
    # -- ranges that depend on the data --------------------------------------------------------
    ("runs export {M} {F}/x.pt --checkpoint 99", r"checkpoint=99 is not valid: must be an int in"),
    ("pefs compute --run {M} --checkpoint 99", r"checkpoint=99 is not valid"),
    ("pefs compute --run {M} --n-examples 100000", r"n_examples=100000 is not valid: .* 1079"),
    ("pefs compute --run {M} --n-examples 0", r"Invalid value for '--n-examples'"),
    ("pefs compute --run {C} --kind lowrank --top-k-classes 99", r"top_k_classes=99 is not"),
    ("pefs compute --run {M} --kind lvrm", r"lvrm PEFs need both --max-classes M and --min-prob"),
    ("pefs dsf --run {M} --n-examples 100000", r"n_examples=100000 is not valid"),
    ("stats compute --run {M} --checkpoints 99", r"checkpoint=99 is not valid"),
    ("stats compute --run {M} --checkpoints x", r"'x': use 'all' or indices like 0,-1"),
    ("stats compute --run {M} --run {M}", r"a run id is given twice"),
    ("stats compute", r"give --run RUN_ID \(repeatable\) or --grid FILE"),
    ("stats plot {S} --checkpoint 99", r"checkpoint=99 is not valid"),
    ("stats plot {S} --metric jacobian_operator", r"has no 'jacobian_operator'; it stores"),
    ("npeff fit --pefs {P} --components 0", r"Invalid value for '--components'"),
    ("npeff fit --pefs {P} --components 999", r"n_components=999 is not valid: .* 32 examples"),
    ("npeff top {N} --components 99", r"component\(s\) \[99\] out of range"),
    ("npeff top {N} --components 0,0", r"has duplicates"),
    ("npeff top {N} --components a,b", r"'a,b' is not a comma-separated list of integers"),
    ("npeff perturb {N} --n-top 100", r"n_top must be an integer in 1\.\.31"),
    ("npeff perturb {N} --epsilon 0", r"Invalid value for '--epsilon': 0\.0 is not in the range"),
    ("npeff perturb {Z}", r"component\(s\) \[1\] of .* are zero"),
    ("npeff sparsify {N} --threshold 2", r"threshold=2\.0 is not valid: must be a number in"),
    ("npeff sparsify {N} --threshold 0.99", r"leaves component\(s\) .* without any entry"),
    ("pefs filter {P}", r"give at least one filter: --incorrect-only, --labels"),
    ("pefs filter {P} --labels ''", r"Invalid value for --labels: is empty"),
    ("pefs filter {P} --indices 9999", r"indices=\[9999\] is not valid.*--indices"),
    ("pefs filter {P} --labels 99", r"--labels 99 keeps no example"),
    ("mask magnitude --run {M}", r"give exactly one of size and fraction"),
    ("mask magnitude --run {M} --size 100000", r"size=100000 must lie in \[0, "),
    ("mask magnitude --run {M} --size 3 --layers (", r"'\(' is not a regular expression"),
    # -- options that do not apply to the chosen mode ------------------------------------------
    (
        "npeff fit --pefs {P} --components 2 --lrm n_iters_g_only=5",
        r"does not apply to --kind diag",
    ),
    ("npeff fit --pefs {P} --components 2 --kind lowrank --solver mu", r"--solver does not apply"),
    ("npeff fit --pefs {P} --components 2 --kind lowrank", r"LRM-NPEFF needs lowrank or lvrm"),
    ("npeff fit --pefs {PL} --components 2 --kind lowrank --lrm nokey=1", r"--lrm nokey: valid"),
    ("npeff fit --pefs {PL} --components 2 --kind lowrank --lrm seed=1", r"give it as --seed"),
    ("npeff fit --pefs {P} --components 2 --lrm bad", r"'bad' is not KEY=VALUE"),
    ("npeff coeffs {N} --pefs {P0}", r"checkpoint 0 but the components were fitted on .* 1"),
    ("npeff coeffs {N} --pefs {PL}", r"holds lowrank PEFs, need diag"),
    ("pefs compute --run {M} --kind diag --top-k-classes 2", r"top_k_classes does not apply to"),
    ("pefs compute --run {M} --storage dense --k 5", r"k does not apply to --storage dense"),
    ("pefs dsf --run {M} --seed 3", r"--seed does not apply to --mode expectation"),
    ("stats compute --run {M} --metric accuracy --target-only", r"target_only does not apply"),
    ("stats compute --run {M} --metric accuracy --method lanczos", r"method does not apply"),
    ("stats compute --run {M} --metric accuracy --input-space raw", r"--input-space does not"),
    ("runs import {F}/garbage.pt --standardize train", r"--standardize does not apply without"),
    ("runs import {F}/garbage.pt --model mlp --module {F}/x.pt", r"either --model .* not both"),
    ("runs import {F}/garbage.pt --key-map order", r"--key-map applies to a state_dict"),
    # -- files to import -----------------------------------------------------------------------
    ("runs import {F}/garbage.pt", r"give --num-classes and --input-shape"),
    ("runs import {F}/garbage.pt --num-classes 10 --input-shape 64", r"neither TorchScript nor"),
    ("runs import {F}/garbage.pt --model mlp --dataset digits", r"is not a torch state_dict"),
    ("runs import {F}/nofile.pt", r"weights file .*nofile\.pt does not exist"),
    ("runs import {F}/garbage.pt --dataset {F}/nofile.npz", r"dataset file .* does not exist"),
    ("runs import {F}/garbage.pt --input-shape a,b --num-classes 3", r"'a,b' is not like"),
    ("data import {F}/nofile.npz", r"no such NPZ dataset file"),
    ("data import {F}/odd.txt", r"expected an \.npz .* or an \.npy file"),
    ("data import {F}/nan.npz", r"x has 80 NaN or infinite value\(s\)"),
    ("data import {F}/nox.npz", r"must hold arrays 'x' and 'y'"),
    ("data import {F}/x.npy", r"holds inputs only: give the labels with --labels"),
    ("pefs import-hdf5 {F}/garbage.pt", r"is not a readable HDF5 file"),
    ("mask import {F}/nofile.npy --run {M}", r"no such mask file"),
    # -- the lake itself -----------------------------------------------------------------------
    ("--lake {F} lake ls", r"is not a curvlake lake \(no lake\.json\)"),
    ("--lake {F}/odd.txt lake ls", r"odd\.txt is a file, not a lake"),
    ("--lake {F}/odd.txt pefs compute --run {M}", r"odd\.txt is a file, not a lake"),
    ("--lake {F}/odd.txt lake init", r"odd\.txt is a file, not a directory"),
]

#: Commands that would write: refused on a lake this process cannot write to.
READ_ONLY = [
    ("train --epochs 1 --param widths=[4]", r"cannot write to the lake at .*: permission denied"),
    ("stats compute --run {M} --metric accuracy --split val", r"cannot write to the lake at"),
    ("pefs compute --run {C} --n-examples 8 --storage dense", r"cannot write to the lake at"),
    ("data import {F}/ok.npz", r"cannot write to the lake at .*: permission denied"),
    ("lake rm {S} -y", r"cannot write to the lake at .*: permission denied"),
    ("lake gc", r"cannot write to the lake at .*: permission denied"),
]


def _zero_component_npeff(lake, npeff_id: str) -> str:
    """A copy of a D-NPEFF fit whose component 1 is zero (as an imported factorization can
    be)."""
    source = lake.open(npeff_id)
    H = source["H"].values.copy()
    H[1] = 0
    writer = lake.begin("npeff", {"zero_component_of": npeff_id}, [source.attrs["pefs"]])
    writer.write("H", H)
    for name in ("W", "kept_columns", "loss", "seconds", "label", "sample_id"):
        writer.write(name, source[name].values)
    attrs = {k: v for k, v in source.attrs.items() if not k.startswith("curvlake:")}
    attrs.pop("coordinates", None)
    writer.set_attrs(**attrs)
    return writer.commit()


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory):
    """One MLP and one CNN run on digits, PEFs (diag at both checkpoints, lowrank), an NPEFF
    fit (and a copy with a zero component), statistics, a weights-only run, and bad files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    lake = open_lake(root / "lake", create=True)
    mlp = run_train(lake, {**TINY, "model_params": {"widths": [8]}}, progress=False)
    cnn = run_train(lake, {**TINY, "model": "cnn5_k", "model_params": {"k": 2}}, progress=False)
    dense = {"storage": "dense", "block_size": 16, "progress": False}
    pefs = run_pefs(lake, cnn, n_examples=32, **dense)
    pefs0 = run_pefs(lake, cnn, checkpoint=0, n_examples=16, **dense)
    lowrank = run_pefs(lake, cnn, n_examples=16, pef_kind="lowrank", **dense)
    npeff = run_npeff_fit(lake, pefs, n_components=3, max_iter=5, progress=False)
    files = root / "files"
    files.mkdir()
    export_state_dict(lake, mlp, files / "mlp.pt")
    weights_only = import_run(
        lake, files / "mlp.pt", model="mlp", model_params={"widths": [8]}, num_classes=10,
        input_shape=[1, 8, 8],
    )  # fmt: skip
    ids = {
        "M": mlp,
        "C": cnn,
        "P": pefs,
        "P0": pefs0,
        "PL": lowrank,
        "N": npeff,
        "Z": _zero_component_npeff(lake, npeff),
        "S": run_stats(lake, [mlp, cnn], metrics=["accuracy"], block_size=512, progress=False),
        "W": weights_only,
        "F": str(files),
    }
    (files / "bad.yaml").write_text("epochs: [1\n  lr: :\n")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    (files / "garbage.pt").write_bytes(b"not a torch file")
    (files / "odd.txt").write_text("hello")
    np.savez(files / "nan.npz", x=np.full((20, 4), np.nan, np.float32), y=np.arange(20) % 2)
    np.savez(files / "nox.npz", y=np.arange(20) % 2)
    np.savez(files / "ok.npz", x=np.ones((20, 4), np.float32), y=np.arange(20) % 2)
    np.save(files / "x.npy", np.ones((20, 4), np.float32))
    return lake, ids


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in root.rglob("*"):
        stat = path.stat()
        found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _assert_one_line_and_nothing_stored(lake, ids, line: str, pattern: str, monkeypatch):
    monkeypatch.chdir(ids["F"])
    args = shlex.split(line.format(**ids))
    args = ["--cluster", "sync", *([] if args[0] == "--lake" else ["--lake", lake.url]), *args]
    before, listed = _snapshot(Path(lake.url)), [i.id for i in lake.list()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [
        text
        for text in result.output.splitlines()
        if text.strip() and not text.startswith(("Usage:", "Try '"))
    ]
    assert len(lines) == 1, result.output
    assert re.search(pattern.format(**ids), lines[0]), lines[0]
    assert _snapshot(Path(lake.url)) == before
    assert [i.id for i in lake.list()] == listed


@pytest.mark.parametrize(("line", "pattern"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_stores_nothing(small_lake, line, pattern, monkeypatch):
    lake, ids = small_lake
    _assert_one_line_and_nothing_stored(lake, ids, line, pattern, monkeypatch)


def _emulate_permissions_for_root(monkeypatch):
    """root writes through missing write bits; emulate what any other user meets, so the
    check that refuses the write is exercised."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and not os.stat(path).st_mode & 0o222:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize(("line", "pattern"), READ_ONLY, ids=[c[0] for c in READ_ONLY])
def test_read_only_lake_is_one_line(small_lake, line, pattern, monkeypatch):
    lake, ids = small_lake
    root = Path(lake.url)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    modes = {p: p.stat().st_mode for p in folders}
    if os.geteuid() == 0:
        _emulate_permissions_for_root(monkeypatch)
    try:
        for folder in folders:
            folder.chmod(modes[folder] & ~0o222)
        _assert_one_line_and_nothing_stored(lake, ids, line, pattern, monkeypatch)
    finally:
        for folder in folders:
            folder.chmod(modes[folder])
