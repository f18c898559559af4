"""The embedded stacks and their builders (mini, tiny, full-random, judge, toy tiles, mini evaluation, test assets)
and the scripts' `--preset` plumbing. Scripts, tests and benchmarks use it; no product package may import it."""
