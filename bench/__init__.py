"""repomem.bench: measurements, kept out of the product core.

`repomem eval` (`evaluate`), `repomem bench splice|ttft|compile|watch|storage` (`splice`, `speed`, `watch`,
`storage`) and `python -m repomem.bench.recall`. They print numbers and never assert on them (tests check
behaviour), and they use only the public names of repomem.core and repomem.native. Measured results and
the commands behind them live in docs/benchmarks.md.
"""
