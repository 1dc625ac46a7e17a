"""chatsrv's benchmark: ``python -m bench`` (see bench/README.md).

Modules: ``_cli`` (the command), ``_sitting`` (the machine, the noise guard, progress lines),
``_run`` (one measured phase), ``_proc`` (the processes and ``/proc``), ``_reference`` (the
naive relay that chatsrv is compared with), ``_compare`` (upstream patterns, ratios),
``_client`` (the load client process), ``_upstream`` (the fake upstream process), ``_script``
(what a stream asks of the fake), ``_pg`` (the bench database and its statement log),
``_profile`` (py-spy), ``_report`` (plot, table, targets).
"""
