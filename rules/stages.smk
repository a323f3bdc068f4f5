# The run stages: one job per planned run, by the stage its experiment gives it; the stages are
# those of the planned runs, served by the registered runners (gemvlab.registry). A run's folder
# name is its run_id, so each rule's wildcard constraint matches only its own runs. The same
# rules make `snakemake verify`'s reruns: {results} is the results folder or verify's.

for _stage in W.stages:

    rule:
        name:
            _stage
        input:
            W.run_inputs,
        output:
            "{results}/runs/{experiment}/{run_id}/metrics.json",
        log:
            "{results}/runs/{experiment}/{run_id}/snakemake.log",
        wildcard_constraints:
            results=W.results_folders,
            run_id=W.run_ids_of(_stage),
        params:
            py=W.python,
            stage=_stage,
            run=W.run_args,
            run_dir=W.run_dir,
        threads: W.run_threads
        resources:
            mem_mb=W.run_mem_mb,
            runtime=W.run_runtime,
            gpu=W.run_gpus,
        shell:
            "{params.py} -m gemvlab.stages {params.stage} {params.run} threads={threads} "
            "hydra.run.dir={params.run_dir} > {log} 2>&1"
