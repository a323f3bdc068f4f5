# KV codebooks (CommVQ): keys and values collected from the model, then codebooks trained on
# them; both are resources named by a hash of the settings that change them, made before the
# evaluations that need them.


rule kv_collect:
    input:
        W.collect_inputs,
    output:
        f"{W.resources}/kv/{{model}}/{{artifact}}/kv.safetensors",
    log:
        f"{W.resources}/kv/{{model}}/{{artifact}}/snakemake.log",
    params:
        py=W.python,
        run=W.collect_args,
        folder=lambda w: f"{W.resources}/kv/{w.model}/{w.artifact}",
    conda:
        "../environment.yml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=W.collect_gpus,
    shell:
        "{params.py} -m gemvlab.stages.kv_collect {params.run} threads={threads} "
        "hydra.run.dir={params.folder} > {log} 2>&1"


rule kv_train:
    input:
        W.train_inputs,
    output:
        f"{W.resources}/codebooks/{{model}}/{{artifact}}/codebooks.safetensors",
    log:
        f"{W.resources}/codebooks/{{model}}/{{artifact}}/snakemake.log",
    params:
        py=W.python,
        run=W.train_args,
        folder=lambda w: f"{W.resources}/codebooks/{w.model}/{w.artifact}",
    conda:
        "../environment.yml"
    threads: 2
    resources:
        mem_mb=12000,
        runtime=60,
    shell:
        "{params.py} -m gemvlab.stages.kv_train {params.run} threads={threads} "
        "hydra.run.dir={params.folder} > {log} 2>&1"
