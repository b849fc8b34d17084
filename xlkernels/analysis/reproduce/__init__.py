"""`xlkernels reproduce`: the papers' claims measured on one model (measure), each turned into a verdict row
(claims), and the report files (report)."""
from .measure import LEVELS, run  # noqa: F401,E402
