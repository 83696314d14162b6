"""The results page (README.md) and the tools that make it (summarize.py: run folders to
tables and figures; benchmark.py, speed.py, directions.py, finetune_depth.py), plus what
the training scripts keep out of their story: runs.py (run folders, resuming, downloads,
command-line checks, precision) and text_data.py (text files to a token cache). A package,
so that the scripts can import it."""
