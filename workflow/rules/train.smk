rule train:
    """Train one cell.  Resumes from checkpoints/state.pt if a killed run left one.  Its only
    parameter is the training identity, so evaluation settings never retrain."""
    input:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    output:
        result=f"{CELL}/train.json",
        last=f"{CELL}/checkpoints/last.pt",
        best=f"{CELL}/checkpoints/best.pt",
    params:
        cell=training_identity,
        out_dir=CELL,
    threads: config["threads"]
    priority: train_priority
    resources:
        gpu=1,
    conda:
        "../../envs/advrepro.conda.yaml"
    log:
        f"{CELL}/logs/train.log",
    shell:
        "{PY} -m methods train --cell {params.cell:q} --data-dir {DATA:q} "
        "--prepared-dir {RESULTS}/data/{wildcards.dataset} --out-dir {params.out_dir:q} "
        "--result {output.result:q} " + WHERE + " > {log} 2>&1"
