"""The science products' command-line interface (issue 15): ``contimg catalog``,
``contimg photometry``, ``contimg sources``, ``contimg mosaic`` and
``contimg simulate-campaign``, each defined beside its code."""

from __future__ import annotations


def add_subcommands(sub):
    from contimg import campaign, catalog, mosaic, photometry, variability

    for mod in (catalog, photometry, variability, mosaic, campaign):
        mod.add_subcommands(sub)
