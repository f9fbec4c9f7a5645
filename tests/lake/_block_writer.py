"""A blocked writer used by the lake tests: ``python -m tests.lake._block_writer LAKE N_BLOCKS``.

Writes a deterministic dense per-example matrix (``pefs`` kind, ``storage=dense``) block by block,
sleeping between blocks so a test can kill it mid-artifact. Prints the blocks it computed.
"""

import sys
import time

import numpy as np

from curvlake.lake import open_lake

ROWS_PER_BLOCK, N_PARAM = 4, 6


def block_values(block: int) -> np.ndarray:
    """Rows of block ``block``: counter-based randomness, independent of which process runs it."""
    return np.random.default_rng([7, block]).random((ROWS_PER_BLOCK, N_PARAM), dtype=np.float32)


def write_matrix(lake_path: str, n_blocks: int, delay: float = 0.0) -> tuple[str, list[int]]:
    lake = open_lake(lake_path, create=True)
    writer = lake.begin("pefs", {"demo": "matrix", "n_blocks": n_blocks})
    if writer.complete:
        return writer.id, []
    n = n_blocks * ROWS_PER_BLOCK
    dense = writer.create_array("dense", (n, N_PARAM), chunks=(ROWS_PER_BLOCK, N_PARAM))
    norm = writer.create_array("dense_norm", (n,), chunks=(ROWS_PER_BLOCK,))
    progress = writer.progress("rows", n_blocks)
    computed = []
    for block in progress.pending():
        rows = slice(block * ROWS_PER_BLOCK, (block + 1) * ROWS_PER_BLOCK)
        values = block_values(block)
        dense[rows] = values
        norm[rows] = np.linalg.norm(values, axis=1)
        progress.mark_done(block)
        computed.append(block)
        print(block, flush=True)
        time.sleep(delay)
    writer.write("logits", np.zeros((n, 3), np.float32))
    writer.write("label", np.zeros(n, np.int64))
    writer.write("sample_id", np.arange(n))
    writer.set_attrs(pef_kind="diag", storage="dense", n_parameters=N_PARAM, num_classes=3)
    return writer.commit(), computed


if __name__ == "__main__":
    write_matrix(
        sys.argv[1], int(sys.argv[2]), delay=float(sys.argv[3]) if len(sys.argv) > 3 else 0
    )
