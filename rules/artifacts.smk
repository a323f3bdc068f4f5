# Artifacts: resources a run needs that a stage of their own makes first (e.g. collected KV,
# then codebooks trained on it), each in a folder named by a hash of exactly the settings that
# change it, made before the runs that need it. Runners declare them (gemvlab.registry.Artifact).

for _stage in W.artifact_stages:

    rule:
        name:
            _stage
        input:
            W.artifact_inputs,
        output:
            f"{{folder}}/{W.artifact_file(_stage)}",
        log:
            "{folder}/snakemake.log",
        wildcard_constraints:
            folder=W.artifact_folders_of(_stage),
        params:
            py=W.python,
            stage=_stage,
            run=W.artifact_args,
        threads: W.artifact_threads
        resources:
            mem_mb=W.artifact_mem_mb,
            runtime=W.artifact_runtime,
            gpu=W.artifact_gpus,
        shell:
            "{params.py} -m gemvlab.stages {params.stage} {params.run} threads={threads} "
            "hydra.run.dir={wildcards.folder} > {log} 2>&1"
