# Stage evaluate: one job per (experiment, run) whose experiment declares stage: evaluate.


rule evaluate:
    input:
        W.run_inputs,
    output:
        f"{W.results}/runs/{{experiment}}/{{run_id}}/metrics.json",
    log:
        f"{W.results}/runs/{{experiment}}/{{run_id}}/snakemake.log",
    wildcard_constraints:
        run_id=W.run_ids_of("evaluate"),
    params:
        py=W.python,
        run=W.run_args,
        run_dir=W.run_dir,
    conda:
        "../environment.yml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "{params.py} -m gemvlab.stages.evaluate {params.run} threads={threads} "
        "hydra.run.dir={params.run_dir} > {log} 2>&1"
