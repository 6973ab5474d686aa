"""fedpeft's benchmarks: measured comparisons, each a module run from the repository root.

Each module here (``python -m benchmarks.<name>``) measures one thing, writes its figures to
``benchmarks/results/<name>.json`` and renders that JSON as its section of
``benchmarks/README.md``; :mod:`benchmarks.run` runs them, each in its own process, and
:mod:`benchmarks.report` assembles the page. Not part of the installed ``fedpeft`` package:
they import ``fedpeft`` and, for the deployment, the test harness in ``tests/deploy``.
"""
