"""Research corpora: fetching (grid.py), HTTP and archive machinery (download.py), listing (corpus.py)."""
