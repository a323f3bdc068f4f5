# gemvlab: fetch_model -> fetch_data -> <experiment stages> -> tables -> claims -> report.
# Knobs (snakemake --config key=value ...):
#   scale=smoke|cpu|gpu|paper   experiments=baseline,...   overrides="hydra overrides for all runs"
#   results=<dir> (default results/, or results/<scale>/ off the cpu scale)   resources=<dir>
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


rule all:
    input:
        W.targets,
    default_target: True
