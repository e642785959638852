"""The run: tasks, the iterative loop and its runtimes, the Parquet store, run folders, comparisons."""
