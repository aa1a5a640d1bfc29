"""What the README and the stream bench claim about the current pipeline and about
what contimg makes (issue 18: no figure the current pipeline does not publish, no
product contimg does not make)."""

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
    first = " ".join(first.split())
    assert "images" in first
    # every science product the README names is made by a module that exists and is a
    # stage of the pipeline or a command (light curves: photometry + variability;
    # mosaics: contimg.mosaic)
    import importlib

    from contimg import pipeline

    for product, module in (("light curves", "contimg.variability"),
                            ("ESE candidates", "contimg.variability"),
                            ("mosaics", "contimg.mosaic"),
                            ("forced photometry", "contimg.photometry")):
        assert product in first, product
        importlib.import_module(module)
    assert "photometry" in pipeline.STAGES
