"""The results page (README.md), its tables and figures, and summarize.py, the tool that
builds them from run folders; a package so that the training scripts can import it."""
