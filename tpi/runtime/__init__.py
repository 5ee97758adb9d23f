"""One rank at run time: memory planning, the sliding window, stats."""
