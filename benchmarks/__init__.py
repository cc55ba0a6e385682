"""viclip's benchmark suite: every stage against a straightforward reference, at full model size.

Run `python -m benchmarks` (or `make bench`). Benchmarks report figures; they
assert nothing, and live apart from the tests.
"""
