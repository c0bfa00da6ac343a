"""Evaluation: FVD / content-debiased FVD (detectors, fvd) and IICR encoder analysis (iicr).

Modules are imported on demand (`from stages.common import fvd`) so importing the package stays cheap.
"""
