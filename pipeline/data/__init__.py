"""Reading, normalising, tokenizing and caching task data with Ray Data."""
