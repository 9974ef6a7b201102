"""Job plumbing that works before torch loads: SPMD start-up and exit, the watchdog, stop
requests and the run folder. Nothing here imports torch or the model."""
