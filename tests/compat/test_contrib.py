"""The contrib/ scheduler files do what the README says: the Slurm batch script, run with
the variables Slurm gives each task of `sbatch --array=1-3`, writes the three parts, which
stitch into the single run's bytes; the Kubernetes Indexed Job keeps completions,
parallelism and LORASTREAM_PARTS equal and runs `--part auto`. (The Ray driver runs on a
real local cluster in test_ray.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from conftest import REPO


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_the_slurm_script_runs_each_array_task_as_its_part(tmp_path, lorastream, run, fixtures_dir):
    base = fixtures_dir / "peft" / "bases" / "llama_f32"
    lora = fixtures_dir / "peft" / "cases" / "llama_f32" / "adapter"
    args = ["merge", "--base", str(base), "--lora", str(lora), "--device", "cpu", "--shard-size", "5000"]
    single = tmp_path / "single"
    run([*args, "--out", f"{single}/"])
    out = tmp_path / "slurm"
    script = REPO / "contrib" / "slurm" / "lorastream-parts.sbatch"
    for task in (1, 2, 3):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))},
            "OUT": f"{out}/",
            "LORASTREAM": str(lorastream),
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": "1",
            "SLURM_ARRAY_TASK_MAX": "3",
            "SLURM_ARRAY_TASK_COUNT": "3",
            "SLURM_CPUS_PER_TASK": "1",
        }
        p = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    run(["stitch", f"{out}/"])
    assert tree(out) == tree(single)


def test_the_indexed_job_runs_part_auto_with_as_many_parts_as_completions():
    job = yaml.safe_load((REPO / "contrib" / "k8s" / "lorastream-parts.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    c = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["LORASTREAM_PARTS"]) == spec["completions"] == spec["parallelism"]
    assert c["args"][c["args"].index("--part") + 1] == "auto"
    stitch = yaml.safe_load((REPO / "contrib" / "k8s" / "lorastream-stitch.yaml").read_text())
    out = c["args"][c["args"].index("--out") + 1]
    assert stitch["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["lorastream", "stitch", out]
