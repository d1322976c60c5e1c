"""Evaluation: scores over a loader or a batch (:mod:`.predictions`), the metrics (:mod:`.metrics`), per-class
thresholds (:mod:`.thresholds`) and the report page (:mod:`.report`)."""
