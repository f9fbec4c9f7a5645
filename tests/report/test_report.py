"""The lake report, read as a person would: parsed with an HTML parser, every image decoded, every
section present; deterministic; artifacts that are not complete flagged with their commands."""

import base64
import io
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from curvlake._cli.common import Settings
from curvlake._cli.report import report as report_command
from curvlake.errors import ArtifactNotFoundError, UserInputError
from curvlake.report import RENDERERS, quickstart_report, write_report
from curvlake.report.html import artifact_anchor, section_id
from curvlake.storage_schema import SPECS
from tests.report.cases import UNKNOWN_ID, write_run

#: Kinds a lake may hold that draw no figure (their inventory row is all there is).
NO_FIGURES = {"grad_window", "hessian_sketch", "latents"}


class Page(HTMLParser):
    """Element ids, images, links and the text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        self.urls += [attrs[a] for a in ("src", "href") if a in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def _mask_time(text: str) -> str:
    return re.sub(r'<time id="generated-at"[^>]*>[^<]*</time>', "<time/>", text)


def _section(text: str, ident: str) -> str:
    start = text.index(f'id="{ident}"')
    return text[start : text.index("</section>", start)]


def test_every_section_present_and_every_image_decodes(synthetic, report):
    lake, _ = synthetic
    page = _page(report.path)
    kinds = {info.kind for info in lake.list()}
    assert {"contents", "inventory", "attention"} <= page.ids
    assert {section_id(kind) for kind in kinds} <= page.ids
    assert {artifact_anchor(info.id) for info in lake.list()} <= page.ids
    assert len(page.images) == report.n_figures == report.n_inlined > 0
    for src in page.images:
        prefix, data = src.split(",", 1)
        assert prefix == "data:image/png;base64"
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 50
    drawn = {kind for kind in kinds if kind in RENDERERS} - {"mystery"}
    assert drawn == set(SPECS) - NO_FIGURES  # the lake holds every kind
    for kind in drawn:
        assert "<img" in _section(report.path.read_text(), section_id(kind)), kind


def test_page_is_self_contained(report):
    page = _page(report.path)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    external = [u for u in page.urls if re.match(r"^(https?:)?//", u)]
    assert not external
    # links are in-page anchors, inlined images or the figure files beside the page
    for url in page.urls:
        if not url.startswith(("#", "data:")):
            assert (report.path.parent / url).is_file(), url


def test_figure_files_beside_the_page(report):
    pngs = sorted(report.figures_dir.glob("*.png"))
    assert len(pngs) == report.n_figures and not list(report.figures_dir.glob("*.svg"))
    for png in pngs:
        Image.open(png).verify()


def test_captions_name_the_artifact_and_command(synthetic, report):
    _, ids = synthetic
    copy = ids["copies"][0]
    text = report.path.read_text()
    for kind, command in (
        ("run", "curvlake train"),
        ("npeff", "curvlake npeff fit"),
        ("comparison_masks", "curvlake compare masks-eigenspace"),
    ):
        captions = re.findall(r"<figcaption>(.*?)</figcaption>", _section(text, section_id(kind)))
        assert any(copy[kind] in caption for caption in captions)
        assert all(f"<code>{command}</code>" in caption for caption in captions)


def test_inventory_shows_provenance_shapes_and_size(synthetic, report):
    lake, ids = synthetic
    run = ids["copies"][0]["run"]
    row = re.search(rf'<tr id="{artifact_anchor(run)}".*?</tr>\n', report.path.read_text(), re.S)
    row = row.group(0)
    assert "complete" in row and "curvlake train" in row and "model=mlp" in row
    assert "<td>theta</td><td>(checkpoint, param)</td><td>3x10</td><td>1x10</td>" in row
    assert re.search(r'<td class="n">[\d.]+ kB</td></tr>', row)
    assert lake.info(run).created_at in row


def test_incomplete_and_failed_artifacts_flagged_with_commands(synthetic, report):
    _, ids = synthetic
    attention = _section(report.path.read_text(), "attention")
    failed = re.search(rf"<tr>.*?{ids['failed']}.*?</tr>", attention, re.S).group(0)
    assert "failed" in failed and "RuntimeError: the fit diverged" in failed
    assert "<code>curvlake npeff fit</code>" in failed
    assert f"<code>curvlake lake rm {ids['failed']}</code>" in failed
    assert "<code>curvlake lake gc</code>" in failed
    staged = re.search(rf"<tr>.*?{ids['staged']}.*?</tr>", attention, re.S).group(0)
    assert "writing (in staging)" in staged and "<code>curvlake pefs compute</code>" in staged
    unknown = re.search(rf"<tr>.*?{UNKNOWN_ID}.*?</tr>", attention, re.S).group(0)
    assert "unknown to this curvlake" in unknown
    # their sections say why there is no figure, the page still has all the others
    assert "the fit diverged" in _section(report.path.read_text(), section_id("npeff"))
    assert "unknown" in _section(report.path.read_text(), section_id("mystery"))


def test_rerun_gives_the_same_bytes_but_the_timestamp(synthetic, tmp_path):
    lake, _ = synthetic
    kinds, formats = ["run", "npeff", "comparison_masks", "mystery"], ["png", "svg"]
    first = write_report(lake, tmp_path / "a" / "report.html", kinds=kinds, formats=formats)
    second = write_report(lake, tmp_path / "b" / "report.html", kinds=kinds, formats=formats)
    a, b = first.path.read_text(), second.path.read_text()
    assert a.count('id="generated-at"') == 1
    assert _mask_time(a) == _mask_time(b)
    names = sorted(p.name for p in first.figures_dir.iterdir())
    assert names == sorted(p.name for p in second.figures_dir.iterdir()) and names
    assert {Path(n).suffix for n in names} == {".png", ".svg"}
    for name in names:
        assert (first.figures_dir / name).read_bytes() == (second.figures_dir / name).read_bytes()
        if name.endswith(".svg"):
            assert ET.parse(first.figures_dir / name).getroot().tag.endswith("svg")


def test_parallel_drawing_gives_the_same_page(synthetic, tmp_path):
    lake, _ = synthetic
    kinds = ["run", "dsf", "probes"]
    serial = write_report(lake, tmp_path / "serial.html", kinds=kinds, jobs=1, generated_at="t")
    parallel = write_report(lake, tmp_path / "par.html", kinds=kinds, jobs=2, generated_at="t")
    assert serial.path.read_bytes() == parallel.path.read_bytes().replace(b"par-", b"serial-")


def test_size_limit_links_the_figures_past_it(synthetic, tmp_path):
    lake, _ = synthetic
    kinds, formats = ["run", "comparison_masks", "hessian_eigs"], ["png"]
    full = write_report(lake, tmp_path / "full.html", kinds=kinds, formats=formats)
    limit = full.bytes - 50_000
    capped = write_report(
        lake, tmp_path / "capped.html", kinds=kinds, formats=formats, max_bytes=limit
    )
    assert capped.bytes <= limit
    assert 0 < capped.n_inlined < capped.n_figures == full.n_figures
    assert capped.path.read_text().count("Not inlined") == capped.n_figures - capped.n_inlined


def test_a_failing_renderer_is_noted_not_fatal(synthetic, tmp_path, monkeypatch):
    lake, _ = synthetic

    def broken(lake, info):
        raise RuntimeError("no luck")

    monkeypatch.setitem(RENDERERS, "dsf", broken)
    result = write_report(lake, tmp_path / "report.html", kinds=["dsf", "run"])
    text = result.path.read_text()
    assert "figures not drawn: RuntimeError: no luck" in _section(text, section_id("dsf"))
    assert "<img" in _section(text, section_id("run"))


def test_selection_errors(synthetic, tmp_path):
    lake, _ = synthetic
    with pytest.raises(UserInputError, match="no artifact of kind nope"):
        write_report(lake, tmp_path / "r.html", kinds=["nope"])
    with pytest.raises(ArtifactNotFoundError, match="run-0000000000000000"):
        write_report(lake, tmp_path / "r.html", ids=["run-0000000000000000"])
    with pytest.raises(UserInputError, match="formats"):
        write_report(lake, tmp_path / "r.html", formats=["jpg"])


def test_drawing_a_report_never_imports_torch(synthetic, tmp_path):
    lake, _ = synthetic
    # the kinds whose renderers import more at draw time: the digits collage, the lineage of
    # probes, xarray/dask reads
    kinds = ["npeff", "probes", "jacobian_stats", "comparison_masks", "mystery"]
    script = (
        "import sys\n"
        "from curvlake.report import write_report\n"
        f"r = write_report({lake.url!r}, {str(tmp_path / 'r.html')!r}, kinds={kinds!r})\n"
        "assert r.n_figures >= 5, r\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_report(synthetic, tmp_path):
    lake, ids = synthetic
    out = tmp_path / "cli.html"
    settings = Settings(lake.url, None, None, "sync", None)
    run = ids["copies"][0]["run"]
    args = ["--out", str(out), "--kind", "run", "--ids", run, "--format", "svg"]
    result = CliRunner().invoke(report_command, args, obj=settings)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "1 artifacts, 1 figures" in result.output
    assert [p.suffix for p in (tmp_path / "cli-figures").iterdir()] == [".svg"]
    bad = CliRunner().invoke(report_command, ["--kind", "nope"], obj=settings)
    # (the root group turns it into one line)
    assert isinstance(bad.exception, UserInputError) and "kind nope" in str(bad.exception)


def test_quickstart_report_beside_the_lake(tmp_path):
    from curvlake.lake import open_lake

    lake = open_lake(tmp_path / "lake", create=True)
    write_run(lake, 0, 8)
    lines = []
    path = quickstart_report(lake, echo=lines.append)
    assert path == str(tmp_path / "quickstart-report.html") and Path(path).is_file()
    assert path in lines[0] and "1 artifacts, 1 figures" in lines[0]


def _blank(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    return pixels.std() < 5


@pytest.mark.skipif(shutil.which("chromium") is None, reason="requires chromium (Debian package)")
def test_chromium_renders_the_page_offline(report, tmp_path):
    """Headless Chromium with every host unresolvable and no proxy: the page (images inlined)
    still renders."""
    shot = tmp_path / "screenshot.png"
    command = [
        "chromium",
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        report.path.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1280, 2400) and not _blank(image)
    # the figures are drawn: a band of the screenshot below the inventory has colour
    colours = np.asarray(image.convert("RGB"))[..., :3].reshape(-1, 3)
    assert len(np.unique(colours // 32, axis=0)) > 20
