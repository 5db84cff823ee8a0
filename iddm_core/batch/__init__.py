"""``iddm batch``: one IDDM job per identity on a Ray cluster, resumable per identity (issue 28; docs/batch.md).

jobs.py reads the jobs (a jobs.csv or a folder of identity folders) with their per-job settings, worker.py runs
one job in a worker process (no Ray), runner.py is the Ray side (actors, retries, Ctrl-C), report.py the batch
report and console progress. Ray is optional (``pip install -e '.[batch]'``): only runner.run_batch needs it.
"""
from .jobs import Job, id_table, load_jobs
from .runner import BatchOptions, import_ray, run_batch

__all__ = ["BatchOptions", "Job", "id_table", "import_ray", "load_jobs", "run_batch"]
