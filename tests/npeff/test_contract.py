"""The pipeline contract (tests/pipelines/contract.py) for the NPEFF pipelines."""

from typing import ClassVar

from curvlake.pipelines.npeff import compute_pefs, fit
from curvlake.pipelines.npeff.compute_pefs import run_dsf, run_pefs
from curvlake.pipelines.npeff.fit import run_npeff_coeffs, run_npeff_fit
from tests.pipelines.contract import PipelineContract, train_tiny_run


class TestPefsContract(PipelineContract):
    module = compute_pefs
    arrays = ("values", "indices", "dense_norm", "logits")
    rtol = 1e-12
    bad_options: ClassVar = [
        ({"k": 0}, r"k=0 is not valid"),
        ({"top_k_classes": 3}, r"top_k_classes does not apply to diag"),
        (
            {"pef_kind": "lowrank", "top_k_classes": 11},
            r"top_k_classes=11 is not valid.*10 classes",
        ),
        ({"n_examples": 10_000}, r"n_examples=10000 is not valid"),
        ({"checkpoint": 7}, r"checkpoint=7 is not valid"),
        ({"storage": "dense", "k": 5}, r"k does not apply to --storage dense"),
        ({"split": "training"}, r"split='training' is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_examples": 40, "k": 64, "block_size": 16, "dtype": "float64", **options}
        return run_pefs(lake, inputs["run_id"], progress=False, **options)


class TestDsfContract(PipelineContract):
    module = compute_pefs
    arrays = ("fisher",)
    rtol = 1e-12
    bad_options: ClassVar = [({"mode": "exact"}, r"mode='exact' is not valid")]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_examples": 40, "block_size": 16, "dtype": "float64", **options}
        return run_dsf(lake, inputs["run_id"], progress=False, **options)


class TestCoeffsContract(PipelineContract):
    module = fit
    arrays = ("W",)
    rtol = 1e-10
    bad_options: ClassVar = [({"method": "lbfgs"}, r"method='lbfgs' is not valid")]

    def make_inputs(self, lake):
        run_id = train_tiny_run(lake)
        pefs = run_pefs(lake, run_id, n_examples=30, k=64, progress=False)
        new = run_pefs(lake, run_id, split="test", n_examples=40, k=64, progress=False)
        npeff = run_npeff_fit(lake, pefs, n_components=3, max_iter=5, progress=False)
        return {"npeff": npeff, "pefs": new}

    def run(self, lake, inputs, **options):
        options = {"block_size": 16, **options}
        return run_npeff_coeffs(lake, inputs["npeff"], inputs["pefs"], progress=False, **options)
