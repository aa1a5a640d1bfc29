"""What the README and the stream bench claim about the current pipeline and about
what contimg makes (issue 18: no figure the current pipeline does not publish, no
product contimg does not make yet)."""

from pathlib import Path

ROOT = Path(__file__).parent.parent
TEXTS = {p: (ROOT / p).read_text() for p in ("README.md", "bench/stream.py")}


def test_only_the_current_pipelines_published_figures_are_quoted():
    for name, text in TEXTS.items():
        assert "8–12" not in text and "8-12" not in text, name
        for figure in ("4.05", "31.1", "10.3"):
            assert figure in text, (name, figure)


def test_the_readme_says_what_contimg_makes_today():
    first = TEXTS["README.md"].split("## What is here", 1)[1].split("|", 1)[0]
    assert "images" in first
    # light curves and mosaics are named only as not made yet
    first = " ".join(first.split())
    assert "light curves and mosaics are not made yet" in first
    assert "images, light curves and mosaics" not in first
