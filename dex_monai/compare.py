# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Side-by-side comparison of MLflow runs (pre-training, fine-tuning, baselines).

Runs are selected from one tracking store by experiment name(s), by tags and/or by run ids; the
comparison is written to a folder and logged as the artifacts of a new "comparison" run:

* ``comparison.md`` -- markdown report: the runs, the parameters that differ, the final metrics
  (last logged value; the minimum too for every metric whose name contains "loss"), the figures;
* ``comparison.csv`` -- one row per run: ``run_id, run_name, experiment, status, start_time,
  params.<name>..., metrics.<name>..., metrics.<name>.min...``;
* ``loss_curves.png`` -- one panel per loss metric, one line per run, x = step;
* ``final_metrics.png`` -- one figure of fixed size: panels for losses, task metrics and routing summaries (final
  values), one bar per run;
* ``expert_usage_by_run.png`` -- one row per run, one panel per modality (layers x experts, shared
  colour scale), from the latest ``routing/expert_usage_epoch_<N>.json`` artifact of each run;
* ``run_heatmaps/<run>_epoch_<N>.png`` -- copies of the latest ``routing/expert_usage_epoch_<N>.png``
  the runs logged themselves;
* ``selection.json`` -- the store, the selection and the compared run ids.

Command line (see ``docs/compare.md``)::

    python -m dex_monai.compare --experiment dex-pretrain --tag stage=pretrain --out eval/comparison
    python -m dex_monai.compare 1f0c... 9ab2... --tracking-uri bundles/dex_pretrain/eval/mlruns.db
    python -m dex_monai.compare benchmark-report --out-dir outputs/transfer_protocol   # transfer protocol report

Tracking store: ``--tracking-uri`` (a URI, or a plain path to an SQLite ``.db`` file or to the
folder holding ``mlruns.db``); without it ``$MLFLOW_TRACKING_URI``, else ``./eval/mlruns.db`` (where
a MONAI bundle run from its root keeps its runs), else ``./mlruns.db`` (the default of MONAI's
``MLFlowHandler``).
"""

import sys

from dex_monai.tracking import *  # noqa: F401,F403  (the comparison lives in dex_monai.tracking)
from dex_monai.tracking import __all__  # noqa: F401
from dex_monai.tracking.compare import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["benchmark-report"]:  # the transfer protocol's table and paired-difference plot
        from dex_monai.benchmark.report import main as benchmark_report

        sys.exit(benchmark_report(sys.argv[2:]))
    sys.exit(main())
