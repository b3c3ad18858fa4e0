"""elcrec-dist: distributed training of the ELCRec sequential recommender."""

__version__ = "0.1.0"
