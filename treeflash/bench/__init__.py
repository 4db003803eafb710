"""`treeflash bench`: every method over a budget sweep, and transformers' own decoding, timed side by side.

  metrics    the numbers a benchmark reports, each defined once (the glossary), runs and their summaries
  runner     what a benchmark runs (`BenchConfig`) and the interleaved, timed runs
  baselines  transformers' `generate` and its prompt-lookup decoding
  render     runs.json, summary.csv and report.md
  analysis   teacher-forced draft distributions against the target's
  plots      the report's charts and drawings of draft trees (matplotlib, optional)

The command itself (flags, loading, writing the files) is `treeflash.cli.bench`.
"""
