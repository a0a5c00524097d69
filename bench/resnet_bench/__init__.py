"""The modules of ``bench/resnet_splits.py`` (its entry point), one job each; see its
docstring for what the benchmark does and how the modules divide it."""
