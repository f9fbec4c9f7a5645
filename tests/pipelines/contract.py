"""The contract every block pipeline keeps, as a test base class each pipeline's tests subclass.

A subclass names the pipeline module (whose ``run_tasks`` the kill test interrupts), builds its
inputs once, and says how to run it::

    class TestPefs(PipelineContract):
        module = compute_pefs
        arrays = ("values", "indices")

        def make_inputs(self, lake): return {"run_id": train_tiny_run(lake)}
        def run(self, lake, inputs, **options): return run_pefs(lake, inputs["run_id"], ...)

        bad_options = [({"k": 0}, "k=0 is not valid")]

The tests: the same config reuses the same id; the output validates against its schema;
results are identical across block sizes and worker counts; a killed run, rerun, computes only
the blocks that were not done and ends with the uninterrupted result; bad input is refused with
a one-line error before anything is staged.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import pytest

from curvlake.engine import client_session
from curvlake.errors import CurvlakeError, UserInputError
from curvlake.lake import Lake, open_lake

TINY_RUN = {
    "model": "mlp",
    "model_params": {"widths": [8]},
    "dataset": "digits",
    "epochs": 1,
    "batch_size": 128,
    "device": "cpu",
}


def train_tiny_run(lake: Lake, **changes: Any) -> str:
    """A one-epoch MLP on digits (a second of CPU)."""
    from curvlake.pipelines.train import run_train

    return run_train(lake, {**TINY_RUN, **changes}, progress=False)


class _Interrupted(Exception):
    """Stands for a kill: raised by the patched task runner after some tasks."""


def _staging_state(lake: Lake) -> list[str]:
    root = Path(lake.url) / "_staging"
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class PipelineContract:
    """Base class of the pipeline contract tests (see the module docstring)."""

    #: The pipeline module whose ``run_tasks`` name the kill test patches.
    module: ClassVar[ModuleType]
    #: Arrays compared between runs.
    arrays: ClassVar[tuple[str, ...]]
    #: The option that sets the block size, and two values to compare.
    block_option: ClassVar[str] = "block_size"
    block_sizes: ClassVar[tuple[int, int]] = (7, 32)
    #: ``(options, message regex)`` that must be refused before anything is staged.
    bad_options: ClassVar[list[tuple[dict[str, Any], str]]] = []
    #: Tolerance of the block-size / worker-count comparisons (0: bit-identical). Run the
    #: pipeline in float64 where batched BLAS kernels round differently for other batch sizes.
    rtol: ClassVar[float] = 0.0

    def make_inputs(self, lake: Lake) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, lake: Lake, inputs: dict[str, Any], **options: Any) -> str:
        raise NotImplementedError

    # -- fixtures ----------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, tmp_path_factory):
        lake = open_lake(tmp_path_factory.mktemp(cls.__name__) / "lake", create=True)
        return lake, cls().make_inputs(lake)

    def _values(self, lake: Lake, artifact: str) -> dict[str, np.ndarray]:
        ds = lake.open(artifact)
        return {name: ds[name].values for name in self.arrays}

    def _assert_same(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
        for name in self.arrays:
            if self.rtol:
                np.testing.assert_allclose(a[name], b[name], rtol=self.rtol, err_msg=name)
            else:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    # -- the contract ------------------------------------------------------------------------

    def test_same_config_reuses_the_id_and_validates(self, setup):
        lake, inputs = setup
        first = self.run(lake, inputs)
        assert self.run(lake, inputs) == first
        lake.validate(first)
        assert lake.info(first).status == "complete"

    def test_identical_across_block_sizes(self, setup):
        lake, inputs = setup
        small, large = (
            self.run(lake, inputs, **{self.block_option: size}) for size in self.block_sizes
        )
        self._assert_same(self._values(lake, small), self._values(lake, large))

    def test_identical_across_worker_counts(self, tmp_path):
        results = []
        for workers in (1, 2):
            other = open_lake(tmp_path / f"w{workers}", create=True)
            other_inputs = self.make_inputs(other)
            with client_session(
                cluster="local", n_workers=workers, threads_per_worker=1, processes=False
            ):
                results.append(self._values(other, self.run(other, other_inputs)))
        self._assert_same(*results)

    def test_killed_run_recomputes_only_pending_blocks(self, setup, tmp_path, monkeypatch):
        lake = open_lake(tmp_path / "kill", create=True)
        inputs = self.make_inputs(lake)
        real = self.module.run_tasks
        calls: list[int] = []

        def killed_after_two(function, tasks, **kwargs):
            real(function, list(tasks)[:2], **kwargs)
            raise _Interrupted

        monkeypatch.setattr(self.module, "run_tasks", killed_after_two)
        with pytest.raises(_Interrupted):
            self.run(lake, inputs, **{self.block_option: self.block_sizes[0]})

        def counting(into: list[int]):
            def run_counted(function, tasks, **kwargs):
                into.append(len(tasks))
                real(function, tasks, **kwargs)

            return run_counted

        fresh_calls: list[int] = []
        monkeypatch.setattr(self.module, "run_tasks", counting(calls))
        resumed = self.run(lake, inputs, **{self.block_option: self.block_sizes[0]})
        fresh_lake = open_lake(tmp_path / "fresh", create=True)
        fresh_inputs = self.make_inputs(fresh_lake)
        monkeypatch.setattr(self.module, "run_tasks", counting(fresh_calls))
        fresh = self.run(fresh_lake, fresh_inputs, **{self.block_option: self.block_sizes[0]})
        assert sum(fresh_calls) > 2, "pick inputs with more than two blocks"
        assert sum(calls) == sum(fresh_calls) - 2  # the two finished blocks are not redone
        self._assert_same(self._values(lake, resumed), self._values(fresh_lake, fresh))

    def test_bad_input_is_refused_before_anything_is_staged(self, setup):
        lake, inputs = setup
        for options, message in self.bad_options:
            before = (_staging_state(lake), [i.id for i in lake.list()])
            with pytest.raises((UserInputError, CurvlakeError), match=message) as raised:
                self.run(lake, inputs, **options)
            assert "\n" not in str(raised.value), "errors are one line"
            assert (_staging_state(lake), [i.id for i in lake.list()]) == before, options


__all__ = ["PipelineContract", "train_tiny_run"]
