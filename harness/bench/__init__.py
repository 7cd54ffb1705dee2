"""The benchmark runner: sweeps of (implementation x model x dtype x batch x prompt x generation x
device) cells, each run in its own child process, written as JSON Lines records (see
:mod:`harness.bench.records`) and rendered into reports (:mod:`harness.bench.report`)."""
