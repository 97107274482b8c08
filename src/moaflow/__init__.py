"""moaflow: rerun Kensert, Harrison & Spjuth (2019) end to end with Snakemake."""

__version__ = "0.1.0"
