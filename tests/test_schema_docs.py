"""docs/SCHEMA.md is generated from the specs; this fails when it is stale."""

from pathlib import Path

from curvlake.storage_schema import SPECS
from curvlake.storage_schema._docs import render_markdown

SCHEMA_MD = Path(__file__).resolve().parents[1] / "docs" / "SCHEMA.md"


def test_schema_md_is_current():
    assert SCHEMA_MD.read_text() == render_markdown(SPECS), (
        "docs/SCHEMA.md is stale: run `python -m curvlake.storage_schema`"
    )


def test_every_kind_documented_and_has_example():
    text = SCHEMA_MD.read_text()
    for kind, spec in SPECS.items():
        assert f"## `{kind}`" in text
        assert spec.example is not None, f"{kind} needs an example for the conformance suite"
