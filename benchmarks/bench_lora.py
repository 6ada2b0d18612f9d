"""Cost of unfused LoRAs: per-step time of 1 and 3 adapters (rank 16 and 64) against none, load time,
and the memory a LoRA adds, on the real SD3.5 Medium width at reduced depth.

    python -m benchmarks.bench_lora --depth 24 --dtype bfloat16 --json lora.json    # on a GPU

Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.measure import machine, mlx_dtype, parser, write_json  # noqa: E402
from sd35m_mlx.lora import files  # noqa: E402
from sd35m_mlx.lora.adapter import Factor  # noqa: E402
from sd35m_mlx.lora.convert import KeyTables, convert  # noqa: E402
from sd35m_mlx.lora.layers import apply, detach_all, layer_table  # noqa: E402
from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel  # noqa: E402


def random_factors(table, rank: int, count: int, dtype, seed: int) -> dict[str, list[tuple[float, Factor]]]:
    key = mx.random.key(seed)
    targets = {}
    for path, shape in table.items():
        if shape is None or len(shape) != 2:
            continue
        out, inp = shape
        items = []
        for _ in range(count):
            key, k1, k2 = mx.random.split(key, 3)
            down = (mx.random.normal((rank, inp), key=k1) / inp**0.5).astype(dtype)
            up = (mx.random.normal((out, rank), key=k2) * 0.01).astype(dtype)
            items.append((1.0, Factor(down=down, up=up, scale=1.0)))
        targets[path] = items
    mx.eval([a for items in targets.values() for _, f in items for a in (f.down, f.up)])
    return targets


def time_step(model, x, context, mods) -> float:
    t0 = time.perf_counter()
    mx.eval(model.denoise(x, context, mods))
    return time.perf_counter() - t0


def write_lora_file(path: Path, table, rank: int, seed: int = 0) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in table.items():
        if shape is None or len(shape) != 2:
            continue
        out, inp = shape
        tensors[f"transformer.{name}.lora_A.weight"] = rng.standard_normal((rank, inp), dtype=np.float32)
        tensors[f"transformer.{name}.lora_B.weight"] = rng.standard_normal((out, rank), dtype=np.float32) * 0.01
    tensors = {k: v.astype(np.float16) for k, v in tensors.items()}  # published LoRAs are 16-bit
    save_file(tensors, str(path))
    return path.stat().st_size


def main() -> None:
    ap = parser(__doc__, dtype="float32", repeats=3)
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks for the step timing (default 2)")
    ap.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks (default 16 64)")
    args = ap.parse_args()
    dtype = mlx_dtype(args.dtype)

    config = MMDiTConfig(num_layers=args.depth, dual_attention_layers=tuple(range(min(args.depth, 13))))
    model = SD3Transformer2DModel(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    table = layer_table(model)
    lat = args.size // 8
    x = mx.random.normal((2, lat, lat, 16)).astype(dtype)
    context = mx.random.normal((2, 333, config.hidden_size)).astype(dtype)
    mods = model.modulations(model.conditioning(mx.array([500.0, 500.0]), mx.random.normal((2, 2048)).astype(dtype)))
    mx.eval(x, context, mods)
    print(f"{machine()}; depth {args.depth}, {args.size} px, {args.dtype}", flush=True)

    results = {"depth": args.depth, "size": args.size, "dtype": args.dtype, "steps": {}, "load": {}}
    configs = {"none": {}}
    for rank in args.ranks:
        for count in (1, 3):
            configs[f"{count} x rank {rank}"] = random_factors(table, rank, count, dtype, seed=rank * 10 + count)
    times: dict[str, list[float]] = {label: [] for label in configs}
    for targets in configs.values():  # warm-up: one step each
        apply(model, targets)
        time_step(model, x, context, mods)
    for _ in range(args.repeats):  # interleaved, so load drift on a shared machine hits every setting alike
        for label, targets in configs.items():
            apply(model, targets)
            times[label].append(time_step(model, x, context, mods))
    detach_all(model)
    base = statistics.median(times["none"])
    for label, ts in times.items():
        t = statistics.median(ts)
        results["steps"][label] = t
        print(f"{label}: {t * 1e3:.1f} ms / step ({t / base:.3f}x)", flush=True)
    del configs

    full = SD3Transformer2DModel(MMDiTConfig())  # all 24 blocks; lazy arrays: only the module tree is used
    full_table = {"transformer": layer_table(full)}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            path = Path(tmp) / f"r{rank}.safetensors"
            size = write_lora_file(path, full_table["transformer"], rank)
            mx.clear_cache()
            before = mx.get_active_memory()
            t0 = time.perf_counter()
            tensors, meta = files.read(path)
            converted = convert(tensors, meta, KeyTables(full_table, 24), str(path))
            arrays = [a for fs in converted.factors["transformer"].values() for f in fs for a in (f.down, f.up)]
            mx.eval(arrays)
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            files.sha256(path)
            t_hash = time.perf_counter() - t0
            del tensors
            added = mx.get_active_memory() - before
            full.set_dtype(dtype)  # lazy: nothing is computed
            targets = {k: [(1.0, f) for f in fs] for k, fs in converted.factors["transformer"].items()}
            apply(full, targets)
            sides = [m._lora for _, m in full.named_modules() if hasattr(m, "_lora")]
            mx.eval([a for s in sides for a in (s.down_t, s.up_t)])
            applied = mx.get_active_memory() - before
            detach_all(full)
            del sides, targets
            results["load"][f"rank {rank}"] = {
                "file_bytes": size,
                "load_s": t_load,
                "sha256_s": t_hash,
                "memory_added_bytes": added,
                "memory_added_applied_bytes": applied,
            }
            print(
                f"load rank {rank} (24 blocks, every Linear): file {size / 2**20:.1f} MiB, convert+read "
                f"{t_load * 1e3:.0f} ms, sha256 {t_hash * 1e3:.0f} ms, memory added {added / 2**20:.1f} MiB, "
                f"applied in {args.dtype} {applied / 2**20:.1f} MiB",
                flush=True,
            )
            del converted, arrays
    write_json(args.json, results)


if __name__ == "__main__":
    main()
