"""The pipeline contract (tests/pipelines/contract.py) for dataset statistics."""

from typing import ClassVar

from curvlake.pipelines.jacobian_stats import pipeline
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from tests.pipelines.contract import PipelineContract, train_tiny_run


class TestStatsContract(PipelineContract):
    module = pipeline
    arrays = ("jacobian_operator", "cross_entropy")
    rtol = 1e-12
    bad_options: ClassVar = [
        ({"metrics": ["jacobian"]}, r"metric='jacobian' is not valid"),
        ({"metrics": ["accuracy"], "normalization": "softmax"}, r"normalization does not apply"),
        ({"checkpoints": [5]}, r"checkpoint=5 is not valid"),
        ({"dtype": "float16"}, r"dtype='float16' is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake, dataset="digits")}

    def run(self, lake, inputs, **options):
        options = {
            "metrics": ["jacobian_operator", "cross_entropy"],
            "split": "test",
            "block_size": 128,
            "dtype": "float64",
            **options,
        }
        return run_stats(lake, [inputs["run_id"]], progress=False, **options)
