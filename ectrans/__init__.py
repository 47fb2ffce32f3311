"""ECTrans: Transformer inference serving for GPU edge servers."""

__version__ = "0.1.0"
