"""The results page (README.md), its data, and the tools that make them: summarize.py (run
folders to tables and figures), benchmark.py, speed.py, directions.py, finetune_depth.py
and long_runs.py. A package, so that the tests and the scripts can import it."""
