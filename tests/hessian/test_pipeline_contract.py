"""The pipeline contract (tests/pipelines/contract.py) for the Hessian sketch, eig and exact."""

from typing import ClassVar

from curvlake.pipelines.hessian import sketch, solve
from curvlake.pipelines.hessian.sketch import run_hessian_sketch
from curvlake.pipelines.hessian.solve import run_hessian_eig
from tests.pipelines.contract import PipelineContract, train_tiny_run

#: Options shared by the runs: 5 blocks of 4 columns (recycled, s = 16, 4 probes) or of 7.
_SMALL = {"n_examples": 40, "k": 8, "probes": 4, "dtype": "float64"}


class TestSketchContract(PipelineContract):
    module = sketch
    arrays = ("outer", "inner", "probe_image")
    block_sizes = (4, 16)
    rtol = 1e-10
    bad_options: ClassVar = [
        ({"k": 0}, r"k=0 is not valid"),
        ({"k": 611}, r"k=611 exceeds the dimension D=610"),
        ({"s": 4}, r"inner sketch size s=4 must be >= k=8"),
        ({"recovery": "hmt", "s": 16}, r"mode 'hmt' has no inner sketch"),
        ({"recovery": "singlepass", "power_iters": 2}, r"power_iters=2 needs mode 'hmt'"),
        ({"recovery": "svd"}, r"recovery='svd' is not valid"),
        ({"noise": "phase"}, r"noise='phase' is not valid"),
        ({"checkpoint": 5}, r"checkpoint=5 is not valid"),
        ({"split": "training"}, r"split='training' is not valid"),
        ({"balanced": True, "n_examples": None}, r"--balanced needs --n-examples"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {**_SMALL, "block_size": 4, **options}
        return run_hessian_sketch(lake, inputs["run_id"], progress=False, **options)


class TestEigContract(PipelineContract):
    """Sketch + solve (HMT with a power iteration: four rounds, two TSQRs in the sketch, the
    eigenvectors signed by their largest entry so that they compare across runs)."""

    module = sketch
    arrays = ("eigenvalues", "eigenvectors", "probe_norms")
    block_sizes = (3, 8)
    rtol = 1e-8
    bad_options: ClassVar = [
        ({"method": "exact"}, r"power_iters, probes does not apply to --method exact"),
        ({"rcond": 1.0}, r"rcond=1.0 is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {**_SMALL, "recovery": "hmt", "power_iters": 1, "block_size": 3, **options}
        if options.get("method") == "exact":
            options.pop("recovery")
        return run_hessian_eig(lake, inputs["run_id"], progress=False, **options)


class TestExactContract(PipelineContract):
    module = solve
    arrays = ("eigenvalues", "eigenvectors", "scree_upper")
    block_sizes = (100, 256)
    rtol = 1e-9
    bad_options: ClassVar = [
        ({"noise": "gaussian"}, r"noise does not apply to --method exact"),
        ({"seed": 1}, r"seed does not apply to --method exact without --balanced"),
        ({"k": 700}, r"k=700 is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_examples": 40, "k": 8, "dtype": "float64", "block_size": 100, **options}
        return run_hessian_eig(lake, inputs["run_id"], method="exact", progress=False, **options)


class TestKrylovContract(PipelineContract):
    """Sketch + solve with block Krylov (depth 2: four rounds, the TSQRs of the growing basis
    between them); the block size divides k, as krylov needs."""

    module = sketch
    arrays = ("eigenvalues", "eigenvectors", "probe_norms")
    block_sizes = (2, 8)
    rtol = 1e-8
    bad_options: ClassVar = [
        ({"block_size": 3}, r"--block-size must divide k; got 3"),
        ({"power_iters": 80}, r"\(power_iters \+ 1\) \* k = 648 columns, more than D=610"),
        ({"s": 16}, r"mode 'krylov' has no inner sketch"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {**_SMALL, "recovery": "krylov", "power_iters": 2, "block_size": 4, **options}
        return run_hessian_eig(lake, inputs["run_id"], progress=False, **options)
