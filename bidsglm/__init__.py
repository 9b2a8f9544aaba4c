"""bidsglm: task-fMRI GLM analysis of fMRIPrep outputs, as a BIDS App."""

__version__ = "0.1.0"
__url__ = "https://github.com/bidsglm/bidsglm"
