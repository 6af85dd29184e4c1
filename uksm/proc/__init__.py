"""Layer 3, the machine's process side: who starts, reaps and recovers.

The supervisor (boot, ksmd, the tasks, teardown) with its recovery and
reaper, ``uksm run`` (run), the long-lived cluster's daemon (transport and
request handlers), the client side of its socket (control), and cleanup
of what a dead cluster left.  It imports the kernel, the host and the
task programs (``uksm.workers``), never the CLI or fault injection
(``uksm.faults``).
"""
