"""`swav report RUN_DIR`: an HTML page with training curves, evaluation results and a cluster gallery."""

from swav.report.build import build_report, main
from swav.report.gallery import prototype_usage, usage_stats

__all__ = ["build_report", "main", "prototype_usage", "usage_stats"]
