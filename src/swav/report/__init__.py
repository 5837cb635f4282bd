"""`swav report RUN_DIR`: an HTML page with training curves, evaluation results and a cluster gallery;
`swav report RUN_DIR RUN_DIR2 ...`: several runs' kNN top-1 against training minutes on one page."""

from swav.report.build import build_report, main
from swav.report.compare import build_comparison
from swav.report.gallery import prototype_usage, usage_stats

__all__ = ["build_comparison", "build_report", "main", "prototype_usage", "usage_stats"]
