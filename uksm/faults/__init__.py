"""Fault injection, the product the CLI's ``uksm inject`` and ``uksm
campaign`` run: ``inject`` (kill workers mid-scan, then check),
``campaign`` (a sweep of injections, local or on Ray) and ``campaign_run``
(one run of a sweep under its guard).  It sits above the public API and
the process side, below the CLI; the benchmarks that drive it are scripts
in ``tools/``, never installed."""
