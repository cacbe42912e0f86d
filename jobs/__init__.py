"""Ray entry points (installed as ``cscr.jobs``): embed, fingerprint, label (Ray Data), train
(Ray Train), sweep (Ray Tune). Each exposes ``run(cfg)`` taking a frozen config and ``main(argv)``
with the same options as its ``cscr`` subcommand; ``cluster`` joins or starts Ray."""
