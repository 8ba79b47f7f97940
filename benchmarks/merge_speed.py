"""Time lines_hf ``ties`` against mergekit ``ties`` on four fine-tunes of a Llama-shaped bf16 model.

Every run is a separate process timed by GNU ``time -v`` (wall time and peak
RSS). The input files are read once before each run, so every run starts with
the same warm page cache. Runs:

- ``lines_hf ties per-tensor baseline``: per-tensor top-k at density 0.2 and one
  global scale of 1, the same merge that mergekit's ``ties`` computes
  (disjoint mean with weights 1, ``normalize: true``): the like-for-like ratio.
- ``lines_hf ties global LiNeS``: the default trim over the whole task vector
  (exact; two extra reading passes), then LiNeS with the automatic alpha (one
  more pass for the L1 norms) and beta 1.
- with ``--all-variants``: per-tensor trimming with LiNeS, and the per-tensor
  baseline with torch's default thread count (2 here).
- ``mergekit ties``: ``mergekit-yaml`` with density 0.2, weight 1 per model.

Inputs come from ``benchmarks/make_llama_checkpoint.py``, for example::

    python benchmarks/make_llama_checkpoint.py --out benchmarks/_work/llama1b_merge --finetunes 4
    flock /tmp/lines_hf_heavy.lock python benchmarks/merge_speed.py --models-dir benchmarks/_work/llama1b_merge

The table prints at the end and is stored, with every run's numbers, in
``<work>/merge_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"


def warm_cache(folders: list[Path]) -> None:
    """Read every weight file once so that each run starts from the same warm page cache."""
    for folder in folders:
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def timed(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` under GNU time and return its wall seconds, peak RSS (bytes) and exit status."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        status = subprocess.run([GNU_TIME, "-v", *command], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    parts = [float(p) for p in elapsed.split(":")]
    seconds = sum(value * 60 ** (len(parts) - 1 - i) for i, value in enumerate(parts))
    return {"wall_s": round(seconds, 1), "outer_wall_s": round(wall, 1), "peak_rss_bytes": rss_kb * 1024, "status": status}


def mergekit_config(base: Path, models: list[Path], density: float) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters:", "      weight: 1.0", f"      density: {density}"]
    lines += ["parameters:", "  normalize: true", "dtype: bfloat16", ""]
    return "\n".join(lines)


def compare_outputs(first: Path, second: Path, name: str) -> dict[str, float]:
    """Return how closely tensor ``name`` of two output folders agrees (fraction equal, max abs difference)."""

    def load(folder: Path) -> torch.Tensor:
        file = folder / "model.safetensors"
        if (folder / "model.safetensors.index.json").is_file():
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            file = folder / index["weight_map"][name]
        with safe_open(file, "pt") as handle:
            return handle.get_tensor(name).float()

    a, b = load(first), load(second)
    base_scale = float(a.abs().mean())
    return {
        "tensor": name,
        "fraction_equal": float((a == b).float().mean()),
        "max_abs_difference": float((a - b).abs().max()),
        "mean_abs_difference_over_mean_abs": float((a - b).abs().mean()) / base_scale,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "benchmarks/_work/llama1b_merge")
    parser.add_argument("--finetunes", type=int, default=4, help="number of fine-tunes ft0 .. ftN-1 to merge")
    parser.add_argument("--mergekit", type=Path, default=ROOT / "benchmarks/_work/mergekit-venv/bin/mergekit-yaml")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks/_work/merge_speed")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--skip-mergekit", action="store_true", help="time lines_hf only")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged folders (2 GB each)")
    parser.add_argument(
        "--all-variants", action="store_true", help="also time per-tensor LiNeS and the per-tensor baseline on 2 threads"
    )
    args = parser.parse_args(argv)

    base = args.models_dir / "base"
    models = [args.models_dir / f"ft{k}" for k in range(args.finetunes)]
    args.work.mkdir(parents=True, exist_ok=True)
    lines_hf = [str(ROOT / ".venv/bin/lines-hf"), "merge", "--base", str(base), "--models", *map(str, models),
                "--method", "ties", "--density", str(args.density), "--no-progress", "--overwrite", "-q"]
    # lines_hf runs with one torch thread unless marked: on a shared machine,
    # OpenMP threads that wait for a busy core slow every step down (seen here
    # as a several-fold slowdown), and one thread leaves the other core free.
    one_thread = ["env", "OMP_NUM_THREADS=1"]
    runs = {
        "lines_hf ties per-tensor baseline": one_thread + lines_hf + ["--ties-trim", "per_tensor", "--no-lines", "--scale", "1"],
        "lines_hf ties global LiNeS": one_thread + lines_hf + ["--ties-trim", "global", "--beta", "1"],
    }
    if args.all_variants:
        runs["lines_hf ties per-tensor baseline, 2 threads"] = lines_hf + [
            "--ties-trim", "per_tensor", "--no-lines", "--scale", "1"
        ]
        runs["lines_hf ties per-tensor LiNeS"] = one_thread + lines_hf + ["--ties-trim", "per_tensor", "--beta", "1"]
    if not args.skip_mergekit:
        config = args.work / "mergekit_ties.yaml"
        config.write_text(mergekit_config(base, models, args.density), encoding="utf-8")
        runs["mergekit ties"] = [str(args.mergekit), str(config), "OUTPUT", "--no-copy-tokenizer", "--quiet"]

    results = {}
    outputs = {}
    for label, command in runs.items():
        output = args.work / re.sub(r"[^a-z0-9]+", "_", label.lower())
        if output.exists():
            shutil.rmtree(output)
        command = [str(output) if word == "OUTPUT" else word for word in command]
        if label.startswith("lines_hf"):
            command += ["--output", str(output)]
        warm_cache([base, *models])
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results[label] = timed(command, args.work / (output.name + ".log"))
        outputs[label] = output
        print(f"  {results[label]}", file=sys.stderr, flush=True)

    comparison = None
    if "mergekit ties" in outputs and all(r["status"] == 0 for r in results.values()):
        comparison = compare_outputs(
            outputs["lines_hf ties per-tensor baseline"], outputs["mergekit ties"], "model.layers.3.mlp.up_proj.weight"
        )
    if not args.keep_outputs:
        for output in outputs.values():
            shutil.rmtree(output, ignore_errors=True)

    record = {"models_dir": str(args.models_dir), "finetunes": args.finetunes, "density": args.density,
              "cpus": os.cpu_count(), "runs": results, "per_tensor_baseline_vs_mergekit": comparison}
    (args.work / "merge_speed.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    reference = results.get("mergekit ties")
    print("| run | wall time (s) | peak RSS (GB) | wall / mergekit | RSS / mergekit |")
    print("|---|---|---|---|---|")
    for label, result in results.items():
        ratio_wall = f"{result['wall_s'] / reference['wall_s']:.3f}" if reference else "-"
        ratio_rss = f"{result['peak_rss_bytes'] / reference['peak_rss_bytes']:.3f}" if reference else "-"
        print(f"| {label} | {result['wall_s']:.1f} | {result['peak_rss_bytes'] / 1e9:.2f} | {ratio_wall} | {ratio_rss} |")
    if comparison:
        print(f"\nper-tensor baseline vs mergekit on {comparison['tensor']}: {comparison}")
    return 0 if all(r["status"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
