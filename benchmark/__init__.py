"""Benchmark of pytaskqml against multiprocessing and Celery+Redis (optionally Ray and Dask).

Run ``python -m benchmark --help`` for the command line; ``make bench`` runs everything.
"""
