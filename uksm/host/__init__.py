"""Layer 0, the host: what uksm borrows from the Linux it runs on.

POSIX shared memory and semaphores (``shm``), the lifeline that kills a
child with its parent (``lifeline``), structured logs (``log``), the oops
channel a dying ksmd writes its exception to (``oops``) and the exit codes
(``exitcodes``).  Nothing here knows of KSM; it imports nothing of uksm.
"""
