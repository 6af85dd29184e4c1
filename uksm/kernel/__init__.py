"""Layer 1, the emulated kernel: ``mm/ksm.c`` and what it touches.

layout (the shared words) -> cluster (the named objects) -> locks ->
memory (frames, the zone) / mm (mm_struct, mm_slot) -> mmu (page faults,
copy-on-write) -> ksm (``__ksm_enter``, ``__ksm_exit``, ``break_cow``,
``run_store``) -> ksmd (``ksm_scan_thread``), exit (``exit_mm``,
``mmput``), oom, fsck, watchdog (khungtaskd), writer (a task writing
``/sys/kernel/mm/ksm/run``).  It imports only ``uksm.host``: it knows
nothing of the supervisor, the tasks' programs, the CLI or fault injection.
"""
