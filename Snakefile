# gemvlab: fetch_model -> fetch_data -> <experiment stages> -> tables -> claims -> report.
# `snakemake verify`, never by default: the runs again into verify_results -> drift tables.
# Knobs (snakemake --config key=value ...):
#   scale=smoke|cpu|gpu|paper   experiments=baseline,...   overrides="hydra overrides for all runs"
#   results=<dir> (default results/, or results/<scale>/ off the cpu scale)   resources=<dir>
#   verify_results=<dir> (default <results>/verify/: not committed)
from snakemake.exceptions import WorkflowError

from gemvlab.errors import GemvlabError
from gemvlab.workflow import Workflow

report: "docs/report/workflow.rst"


include: "rules/hooks.smk"

try:
    W = Workflow.from_config(config)
except GemvlabError as exc:  # a --config or config mistake: its one line, no traceback
    raise WorkflowError(str(exc)) from None


include: "rules/fetch.smk"
include: "rules/stages.smk"
include: "rules/artifacts.smk"
include: "rules/report.smk"
include: "rules/verify.smk"


rule all:
    input:
        W.targets,
    default_target: True


# Explicit only (`snakemake verify`): reruns this machine's share of the plan, then compares.
# A function, so that only a verify asks which runs this machine can run (torch's CUDA check).
rule verify:
    input:
        lambda wildcards: W.verify_targets,
    params:
        py=W.python,
        drift=lambda wildcards: W.drift_tables,
    log:
        f"{W.results}/reports/verify.log",
    localrule: True
    # Fails, one line per experiment, when a rerun did not give the committed numbers back.
    shell:
        "{params.py} -m gemvlab.results.drift {params.drift} 2>{log} || {{ cat {log} >&2; exit 1; }}"
